"""``experiment=commonsense_tiny`` end to end: every method, every tier, every benchmark; resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose_config

from ubsmoe.names import METHODS
from ubsmoe.runner import run_experiment

pytestmark = pytest.mark.slow

BENCHMARKS = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
TIERS = ["t25", "t50", "t75", "t100"]
# commonsense_tiny, smaller still (every method trains here): few examples and short sequences.
SMALL = (
    "experiment=commonsense_tiny",
    "federation.num_clients=4",
    "federation.clients_per_round=2",
    "data.max_train_examples=64",
    "data.max_eval_examples=2",
    "data.max_length=160",
    "data.eval_mode=likelihood",
    "model.k_max=4",  # K = 1 / 2 / 3 / 4 across the tiers (the tiny model's own top-2 would give 1 / 1 / 1 / 2)
    "logger=none",
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(out: Path, *overrides: str) -> float | None:
    return run_experiment(compose_config(*SMALL, f"paths.output_dir={out}", *overrides))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_two_rounds_with_every_tier_and_benchmark(tmp_path: Path, method: str) -> None:
    extra = ("data.eval_mode=both", "data.max_new_tokens=3") if method == "ubsmoe" else ()
    result = run(tmp_path, f"method={method}", *extra)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["round"], r["tier"]) for r in records] == [(r, t) for r in (1, 2) for t in TIERS]
    for r in records:
        assert r["evaluated"] and r["task"] == "commonsense" and r["method"] == method
        assert {f"{b}/acc" for b in BENCHMARKS} <= set(r["metrics"])
        assert r["main_metric"] == r["metrics"]["mean_acc"]
        assert 0.0 <= r["main_metric"] <= 1.0 and r["flops_per_example"] > 0
        assert r["train_loss"] is None or r["train_loss"] > 1.0  # every batch has response tokens to learn
        if method == "ubsmoe":
            assert {f"{b}/acc_gen" for b in BENCHMARKS} | {f"{b}/no_answer" for b in BENCHMARKS} <= set(r["metrics"])
    last = [r for r in records if r["round"] == 2]
    assert result == pytest.approx(sum(r["main_metric"] for r in last) / len(last))
    ks, ranks = [r["k"] for r in last], [r["rank"] for r in last]
    flops = [r["flops_per_example"] for r in last]
    assert all(r["expert_entropy"] is not None and len(r["expert_entropy"]) == 2 for r in last)  # 2 MoE layers
    if ks[0] is not None:  # heterogeneous K: 1..4 experts, and the cost grows with K
        assert ks == [1, 2, 3, 4] and flops == sorted(flops) and flops[0] < flops[-1]
    elif ranks[0] is not None:  # heterogeneous rank at K = K_max: r = 1..4, the cost grows with r
        assert ranks == [1, 2, 3, 4] and flops == sorted(flops) and flops[0] < flops[-1]
    else:  # FedIT: one rank, one K for everyone
        assert len(set(flops)) == 1


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    straight = run(tmp_path / "straight", "federation.rounds=2")
    run(tmp_path / "part", "federation.rounds=1")
    resumed = run(tmp_path / "resumed", "federation.rounds=2", f"resume={tmp_path / 'part'}")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_time"} for r in rs]  # noqa: E731
    a = strip(read_jsonl(tmp_path / "straight" / "metrics.jsonl"))
    b = strip(read_jsonl(tmp_path / "resumed" / "metrics.jsonl"))
    assert len(a) == len(b) == 8
    for ra, rb in zip(a, b, strict=True):
        assert rb["metrics"] == pytest.approx(ra["metrics"], abs=1e-9)
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], abs=1e-6) if ra["train_loss"] is not None else True
        assert {k: v for k, v in rb.items() if k not in ("metrics", "train_loss")} == {
            k: v for k, v in ra.items() if k not in ("metrics", "train_loss")
        }
    assert resumed == pytest.approx(straight, abs=1e-9)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_every_tiny_family_runs_the_path(tmp_path: Path, family: str) -> None:
    run(tmp_path, f"model=tiny_{family}", "federation.rounds=1", "data.train_benchmarks=[boolq,openbookqa]")
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["k"] for r in records] == [1, 2, 3, 4]
    assert all({f"{b}/acc" for b in BENCHMARKS} <= set(r["metrics"]) for r in records)
