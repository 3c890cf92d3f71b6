"""The smoke experiment under injected faults: it finishes, stays finite, logs exactly the faults, repeats exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import compose_config

from ubsmoe.fl.checkpoint import load_checkpoint, round_file
from ubsmoe.fl.faults import FaultInjection
from ubsmoe.fl.server import ClientSampler
from ubsmoe.runner import run_experiment
from ubsmoe.seeding import derive_seed

pytestmark = pytest.mark.slow

NUM_CLIENTS, PER_ROUND, ROUNDS = 6, 3, 4
TINY = (
    "experiment=smoke",
    f"federation.num_clients={NUM_CLIENTS}",
    f"federation.clients_per_round={PER_ROUND}",
    f"federation.rounds={ROUNDS}",
    "federation.local_steps=2",
    "data.max_train_examples=240",
    "data.max_eval_examples=32",
    "logger=none",
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


def run(out: Path, *overrides: str, glue_dir: Path, cache_dir: Path) -> None:
    cfg = compose_config(
        *TINY, f"paths.output_dir={out}", f"data.local_dir={glue_dir}", f"paths.cache_dir={cache_dir}", *overrides
    )
    run_experiment(cfg)


def injected(seed: int, faults: FaultInjection) -> dict[tuple[int, int], str]:
    """(1-based round, client) -> fault, recomputed from the seeds alone."""
    sampler = ClientSampler(NUM_CLIENTS, PER_ROUND, derive_seed(seed, "sampling"))
    out = {}
    for round_idx in range(ROUNDS):
        for client in sampler.sample():
            fault = faults.draw(seed, round_idx, client)
            if fault is not None:
                out[(round_idx + 1, client)] = fault
    return out


def all_finite(tensors: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_faulty_smoke_finishes_finite_logs_exactly_the_injected_clients_and_repeats(
    tmp_path: Path, glue_dir: Path, cache_dir: Path
) -> None:
    seed = 4
    faults = FaultInjection(fail=0.3, nonfinite=0.2)
    expected = injected(seed, faults)
    assert {"fail", "nonfinite"} <= set(expected.values())  # the seed exercises both kinds
    assert sum(1 for r, _ in expected if r == ROUNDS) == PER_ROUND  # and a round with no good reply
    overrides = (f"seed={seed}", "federation.faults.fail=0.3", "federation.faults.nonfinite=0.2")
    kw = {"glue_dir": glue_dir, "cache_dir": cache_dir}
    run(tmp_path / "a", *overrides, **kw)
    run(tmp_path / "b", *overrides, **kw)

    a = tmp_path / "a"
    logged = read_jsonl(a / "faults.jsonl")
    assert {(r["round"], r["client"]) for r in logged} == set(expected)
    assert len(logged) == len(expected)
    kinds = {"fail": "error", "nonfinite": "nonfinite"}
    assert all(r["kind"] == kinds[expected[(r["round"], r["client"])]] for r in logged)

    metrics = read_jsonl(a / "metrics.jsonl")
    for round_number in range(1, ROUNDS + 1):
        rows = [r for r in metrics if r["round"] == round_number]
        dropped = sum(1 for key in expected if key[0] == round_number)
        assert sum(r["dropped_clients"] for r in rows) == dropped
        assert sum(r["num_clients"] for r in rows) == PER_ROUND - dropped
        assert {r["skipped"] for r in rows} == {dropped == PER_ROUND}
        assert all(math.isfinite(r["main_metric"]) for r in rows)
        assert all(r["train_loss"] is None or math.isfinite(r["train_loss"]) for r in rows)
    state = load_checkpoint(a / "checkpoints" / "last.ckpt")
    assert state["server"]["round"] == ROUNDS
    assert all_finite(state["server"]["global_state"]) and all_finite(state["server"]["pg_defaults"])

    b = tmp_path / "b"
    assert without_time(read_jsonl(b / "metrics.jsonl")) == without_time(metrics)
    assert (b / "faults.jsonl").read_bytes() == (a / "faults.jsonl").read_bytes()
    assert (b / "experts.jsonl").read_bytes() == (a / "experts.jsonl").read_bytes()


def test_a_round_with_too_few_good_replies_keeps_the_previous_state(
    tmp_path: Path, glue_dir: Path, cache_dir: Path
) -> None:
    seed = 2
    hit = injected(seed, FaultInjection(nonfinite=0.3))
    skipped_rounds = {r for r, _ in hit}  # min_replies = all sampled clients: any fault skips the round
    assert skipped_rounds - {1} and set(range(2, ROUNDS + 1)) - skipped_rounds  # both cases after round 1
    out = tmp_path / "run"
    run(out, f"seed={seed}", "federation.faults.nonfinite=0.3", f"federation.min_replies={PER_ROUND}",
        f"checkpoint.keep={ROUNDS}", glue_dir=glue_dir, cache_dir=cache_dir)  # fmt: skip
    metrics = read_jsonl(out / "metrics.jsonl")
    assert {r["round"] for r in metrics if r["skipped"]} == skipped_rounds
    for round_number in range(2, ROUNDS + 1):
        before = load_checkpoint(round_file(out / "checkpoints", round_number - 1))["server"]
        after = load_checkpoint(round_file(out / "checkpoints", round_number))["server"]
        kept = round_number in skipped_rounds
        for part in ("global_state", "pg_defaults", "utilization"):
            assert set(after[part]) == set(before[part])
            same = [torch.equal(after[part][name], before[part][name]) for name in before[part]]
            if kept:
                assert all(same), (round_number, part)  # tensor by tensor: nothing moved
            elif part == "global_state":
                assert not all(same), round_number
        rows = [r for r in metrics if r["round"] == round_number]
        previous = [r for r in metrics if r["round"] == round_number - 1]
        if kept:  # the same global model evaluates to the same numbers
            assert [r["metrics"] for r in rows] == [r["metrics"] for r in previous]
