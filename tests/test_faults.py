"""Fault injection, reply validation and the local backend's failure handling (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose_config, make_update

from ubsmoe.assembly import fault_policy

from ubsmoe.settings import Tier

from ubsmoe.validate import validate
from ubsmoe.errors import ConfigError
from ubsmoe.fl.backends import ClientJob, ClientResult, LocalBackend
from ubsmoe.fl.client import ClientPayload, ClientSpec
from ubsmoe.fl.faults import (
    FAULT_KINDS,
    DroppedClient,
    FaultInjection,
    FaultLog,
    FaultPolicy,
    inject_bad_shape,
    inject_nonfinite,
)
from ubsmoe.fl.validation import screen_results, validate_update


def payload() -> ClientPayload:
    g = torch.Generator().manual_seed(0)
    return ClientPayload(
        state={"a.lora_A": torch.randn(2, 5, generator=g), "head.weight": torch.randn(3, 4, generator=g)},
        pg_defaults={"layer0": torch.zeros(4, 6)},
    )


def good_update(client_id: int = 0, *, sent: ClientPayload | None = None):
    sent = sent or payload()
    state = {k: v + 0.01 for k, v in sent.state.items()}
    update = make_update(state, 10, client_id=client_id, pg_defaults={k: v.clone() for k, v in sent.pg_defaults.items()})
    return update


def job(client_id: int, sent: ClientPayload | None = None) -> ClientJob:
    spec = ClientSpec(client_id=client_id, tier=Tier(f"t{client_id % 2}", 0.5, 0.5), tier_index=0, k=2, rank=None)
    return ClientJob(spec, sent or payload(), round_idx=0)


# ----------------------------------------------------------------------------- injection
def test_draws_are_reproducible_independent_of_order_and_follow_the_probabilities() -> None:
    faults = FaultInjection(fail=0.3, nonfinite=0.2, bad_shape=0.1, straggler=0.1)
    pairs = [(r, c) for r in range(50) for c in range(40)]
    forward = {p: faults.draw(7, *p) for p in pairs}
    backward = {p: faults.draw(7, *p) for p in reversed(pairs)}
    assert forward == backward
    assert forward != {p: faults.draw(8, *p) for p in pairs}
    counts = {kind: sum(v == kind for v in forward.values()) / len(pairs) for kind in (*FAULT_KINDS, None)}
    for kind, p in (("fail", 0.3), ("nonfinite", 0.2), ("bad_shape", 0.1), ("straggler", 0.1), (None, 0.3)):
        assert abs(counts[kind] - p) < 0.04, (kind, counts[kind])
    assert FaultInjection().draw(7, 0, 0) is None


def test_injected_corruptions_are_the_ones_validation_catches() -> None:
    sent = payload()
    for seed in range(20):
        rng = FaultInjection.detail_rng(seed, 0, 0)
        update = good_update(sent=sent)
        inject_nonfinite(update.state, rng)
        assert validate_update(update, sent).kind == "nonfinite"
        update = good_update(sent=sent)
        name = inject_bad_shape(update.state, rng)
        assert validate_update(update, sent).kind in {"missing", "shape"}
        assert name in validate_update(update, sent).reason


# ----------------------------------------------------------------------------- validation
def test_validation_accepts_a_good_update_and_names_each_problem() -> None:
    sent = payload()
    assert validate_update(good_update(sent=sent), sent) is None
    cases = {
        "dtype": lambda u: u.state.__setitem__("head.weight", u.state["head.weight"].double()),
        "unexpected": lambda u: u.state.__setitem__("extra", torch.zeros(1)),
        "invalid": lambda u: setattr(u, "num_examples", 0),
    }
    for kind, corrupt in cases.items():
        update = good_update(sent=sent)
        corrupt(update)
        assert validate_update(update, sent).kind == kind
    update = good_update(sent=sent)
    update.pg_defaults["layer0"] = torch.full((4, 6), float("inf"))
    assert validate_update(update, sent).reason.startswith("pg_defaults")
    update = good_update(sent=sent)
    update.train_loss = math.nan
    assert validate_update(update, sent).kind == "nonfinite"
    assert validate_update("garbage", sent).kind == "invalid"


def test_update_norm_cap() -> None:
    sent = payload()
    update = good_update(sent=sent)  # every entry moved by 0.01: norm 0.01 * sqrt(22)
    norm = 0.01 * math.sqrt(22)
    assert validate_update(update, sent, max_update_norm=norm * 1.01) is None
    assert validate_update(update, sent, max_update_norm=norm * 0.99).kind == "norm"


def test_rank_payloads_are_checked_against_what_the_client_received() -> None:
    """A rank-r_c client gets zero-padded tensors; its reply is checked against those, shape for shape."""
    sent = payload()
    truncated = ClientPayload(state={**sent.state, "a.lora_A": torch.cat([sent.state["a.lora_A"][:1], torch.zeros(1, 5)])})
    update = make_update({k: v.clone() for k, v in truncated.state.items()}, 5)
    assert validate_update(update, truncated) is None
    update.state["a.lora_A"] = update.state["a.lora_A"][:1]
    assert validate_update(update, truncated).kind == "shape"


def test_screen_results_keeps_good_updates_and_records_the_rest() -> None:
    jobs = [job(c) for c in (4, 1, 3, 2)]
    bad = good_update(3)
    bad.state["a.lora_A"][0, 0] = float("nan")
    results = [
        ClientResult(1, good_update(1)),
        ClientResult(2, None, error="InjectedFailure: boom"),
        ClientResult(3, bad),
        # client 4 never replied
    ]
    good, dropped = screen_results(jobs, results, round_number=5)
    assert [u.spec.client_id for u in good] == [1]
    assert [(d.round, d.client, d.kind) for d in dropped] == [(5, 2, "error"), (5, 3, "nonfinite"), (5, 4, "error")]
    assert dropped[0].tier == "t0" and "boom" in dropped[0].reason
    impostor = good_update(6)
    assert screen_results([job(1)], [ClientResult(1, impostor)], round_number=1)[1][0].kind == "invalid"
    timeout = ClientResult(1, None, error="timeout: no reply within federation.round_timeout=5s")
    assert screen_results([job(1)], [timeout], round_number=1)[1][0].kind == "timeout"


def test_fault_log_appends_and_rewrites_from_its_state(tmp_path: Path) -> None:
    log = FaultLog(tmp_path)
    log.rewrite()
    log.add([DroppedClient(1, 3, "t50", "error", "x"), DroppedClient(2, 0, "t25", "shape", "y")])
    lines = [json.loads(x) for x in (tmp_path / "faults.jsonl").read_text().splitlines()]
    assert lines == [
        {"round": 1, "client": 3, "tier": "t50", "kind": "error", "reason": "x"},
        {"round": 2, "client": 0, "tier": "t25", "kind": "shape", "reason": "y"},
    ]
    resumed = FaultLog(tmp_path)
    resumed.load_state_dict({"records": log.state_dict()["records"][:1]})
    resumed.rewrite()
    assert len((tmp_path / "faults.jsonl").read_text().splitlines()) == 1


# ----------------------------------------------------------------------------- local backend
def fake_loop(policy: FaultPolicy) -> SimpleNamespace:
    strategy = SimpleNamespace(client_regularizer=lambda spec: None)
    data = SimpleNamespace(clients={c: None for c in range(10)})
    return SimpleNamespace(fabric=None, module=None, data=data, strategy=strategy, seed=0, local_steps=1,
                           local_epochs=None, faults=policy, rounds=1, prox_mu=0.0)  # fmt: skip


def test_local_backend_turns_exceptions_and_late_stragglers_into_results(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_train(fabric, module, spec, payload, data, **kw):
        if spec.client_id == 2:
            raise FloatingPointError("loss is nan")
        update = good_update(spec.client_id)
        update.simulated_delay = 100.0 if spec.client_id == 3 else 0.0
        return update

    monkeypatch.setattr("ubsmoe.fl.backends.local.train_client", fake_train)
    backend = LocalBackend()
    backend.start(fake_loop(FaultPolicy(round_timeout=50.0)))
    seen = []
    results = backend.train_clients([job(3), job(1), job(2)], on_done=lambda r: seen.append(r.client_id))
    assert [r.client_id for r in results] == seen == [1, 2, 3]
    assert results[0].ok
    assert not results[1].ok and results[1].error == "FloatingPointError: loss is nan"
    assert not results[2].ok and results[2].error.startswith("timeout") and results[2].seconds >= 100.0
    backend.start(fake_loop(FaultPolicy(round_timeout=None)))
    assert backend.train_clients([job(3)])[0].ok  # without a timeout a straggler is only slow


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("federation.faults.fail=1.5", "federation.faults.fail"),
        ("federation.faults.nonfinite=-0.1", "federation.faults.nonfinite"),
        ("+federation.faults.typo=0.1", "federation.faults.typo"),
        ("federation.min_replies=0", "federation.min_replies"),
        ("federation.min_replies=11", "federation.min_replies"),
        ("federation.round_timeout=0", "federation.round_timeout"),
        ("federation.max_update_norm=-1", "federation.max_update_norm"),
        ("federation.faults.straggler_delay=-1", "federation.faults.straggler_delay"),
        ("checkpoint.keep=0", "checkpoint.keep"),
    ],
)
def test_fault_and_checkpoint_keys_are_validated(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(override))
    assert err.value.key == key


def test_fault_probabilities_must_sum_to_at_most_one() -> None:
    cfg = compose_config("federation.faults.fail=0.6", "federation.faults.nonfinite=0.5")
    with pytest.raises(ConfigError, match="sum to at most 1") as err:
        validate(cfg)
    assert err.value.key == "federation.faults"


def test_fault_policy_from_config() -> None:
    cfg = compose_config("federation.faults.fail=0.3", "federation.round_timeout=30", "federation.min_replies=2")
    validate(cfg)
    policy = fault_policy(cfg)
    assert policy.injection.fail == 0.3 and policy.round_timeout == 30.0 and policy.min_replies == 2
    assert policy.max_update_norm is None
    assert fault_policy(compose_config()) == FaultPolicy()  # defaults: nothing injected, nothing capped


# ----------------------------------------------------------------------------- client
def test_client_stops_on_a_nonfinite_loss_and_injects_its_own_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L
    from helpers import build, make_batch

    from ubsmoe.fl.client import train_client
    from ubsmoe.fl.faults import InjectedFailure, NonFiniteLoss

    module = build()
    fabric = L.Fabric(accelerator="cpu", devices=1)
    spec = ClientSpec(client_id=1, tier=Tier("t", 0.5, 1.0), tier_index=0, k=4, rank=None)
    sent = ClientPayload(state=module.trainable_state(), pg_defaults=module.pg_defaults())
    data = SimpleNamespace(num_examples=8, batches=lambda round_idx, num_steps, num_epochs: iter([make_batch()] * num_steps))
    kw = {"round_idx": 0, "local_steps": 2, "local_epochs": None, "seed": 0}

    update = train_client(fabric, module, spec, sent, data, **kw)
    assert validate_update(update, sent) is None and update.num_steps == 2
    # a client whose draw is "nonfinite" sends a NaN/Inf tensor, which the server catches
    nonfinite = next(s for s in range(100) if FaultInjection(nonfinite=0.5).draw(s, 0, 1) == "nonfinite")
    update = train_client(fabric, module, spec, sent, data, **{**kw, "seed": nonfinite}, faults=FaultInjection(nonfinite=0.5))
    assert validate_update(update, sent).kind == "nonfinite"
    with pytest.raises(InjectedFailure):
        train_client(fabric, module, spec, sent, data, **kw, faults=FaultInjection(fail=1.0))

    calls = []

    def nan_loss(batch, step):
        calls.append(step)
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(module, "training_step", nan_loss)
    with pytest.raises(NonFiniteLoss, match="client 1"):
        train_client(fabric, module, spec, sent, data, **kw)
    assert calls == [0]  # stopped at the first bad step, nothing sent
