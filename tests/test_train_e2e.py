"""End to end on the local SST-2: the smoke experiment, determinism, resume, and CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose_config, run_train_cli

from ubsmoe.runner import run_experiment

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# The smoke experiment, smaller still: every test here trains for real.
TINY = (
    "experiment=smoke",
    "federation.num_clients=6",
    "federation.clients_per_round=2",
    "federation.local_steps=2",
    "data.max_train_examples=240",
    "data.max_eval_examples=32",
    "logger=none",
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


def run(tmp: Path, *overrides: str, glue_dir: Path, cache_dir: Path) -> float | None:
    cfg = compose_config(
        *TINY, f"paths.output_dir={tmp}", f"data.local_dir={glue_dir}", f"paths.cache_dir={cache_dir}", *overrides
    )
    return run_experiment(cfg)


def test_smoke_cli_writes_every_tier_and_wandb_histograms(smoke_runs: dict[str, Path]) -> None:
    out = smoke_runs["ubsmoe"]
    records = read_jsonl(out / "metrics.jsonl")
    tiers = ["t25", "t50", "t75", "t100"]
    for round_idx in (1, 2):
        rows = [r for r in records if r["round"] == round_idx]
        assert [r["tier"] for r in rows] == tiers
        assert all(r["evaluated"] and 0.0 <= r["metrics"]["accuracy"] <= 1.0 for r in rows)
        assert [r["k"] for r in rows] == [2, 4, 6, 8]
        flops = [r["flops_per_example"] for r in rows]
        assert flops == sorted(flops) and flops[0] < 0.6 * flops[-1]  # weak tiers really compute less
        assert all(len(r["expert_entropy"]) == 6 for r in rows)
    assert (out / "partition.png").stat().st_size > 1000
    assert (out / "checkpoints" / "last.ckpt").is_file()
    # offline W&B run with the expert histograms and heatmaps
    wandb_runs = list((out / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    log = next(wandb_runs[0].glob("*.wandb")).read_bytes()
    assert b"experts/train_utilization/layer0" in log and b"histogram" in log
    assert list((wandb_runs[0] / "files" / "media" / "images").rglob("*.png"))
    # the dense baseline runs the same path; its rank and FLOPs do not depend on the tier
    dense = read_jsonl(smoke_runs["fedit"] / "metrics.jsonl")
    assert {r["flops_ratio_to_dense"] for r in dense} == {1.0}
    assert all(r["k"] is None and r["expert_entropy"] == [] for r in dense)


def test_timings_measure_each_tiers_local_training(smoke_runs: dict[str, Path]) -> None:
    """Every round records each tier's steps and seconds per step; peak memory is null off CUDA.

    The phases split the round's wall time exactly, evaluation costs time only in the rounds
    that evaluate, and the process's setup (data, model with its MoEfication) is recorded once.
    """
    records = read_jsonl(smoke_runs["ubsmoe"] / "timings.jsonl")
    evaluated = {r["round"] for r in read_jsonl(smoke_runs["ubsmoe"] / "metrics.jsonl") if r["evaluated"]}
    assert [("setup_seconds" in r) for r in records] == [True] + [False] * (len(records) - 1)
    assert set(records[0]["setup_seconds"]) == {"data", "model", "engine"}
    assert records[0]["setup_seconds"]["model"] > 0
    for record in records:
        phases = record["phases"]
        assert list(phases) == ["clients", "aggregate", "evaluate", "round_end_callbacks", "checkpoint", "other"]
        assert sum(phases.values()) == pytest.approx(record["round_seconds"], abs=1e-3)
        assert phases["clients"] > 0 and phases["aggregate"] > 0 and phases["checkpoint"] > 0
        assert (phases["evaluate"] > 0) == (record["round"] in evaluated)
        assert record["train_eval_seconds"] == pytest.approx(phases["clients"] + phases["evaluate"], abs=1e-3)
        assert list(record["tiers"]) == ["t25", "t50", "t75", "t100"]
        costs = record["tiers"].values()
        assert sum(c["clients"] for c in costs) > 0
        for cost in costs:
            assert cost["peak_memory_bytes"] is None
            assert (cost["train_seconds_per_step"] > 0) if cost["clients"] else cost["train_seconds_per_step"] is None


@pytest.mark.parametrize(("method", "distinct"), [("fedit", 1), ("hetlora", 4)])
def test_tiers_with_the_same_model_share_one_evaluation_with_the_same_numbers(
    method: str, distinct: int, tmp_path: Path, glue_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dense method's four tiers receive one model: it is evaluated once, and every number is as before.

    The reference run evaluates every tier on its own (payloads never compared equal).
    """
    from ubsmoe.fl.client import ClientPayload
    from ubsmoe.model import FederatedModel

    calls = []
    evaluate = FederatedModel.evaluate
    monkeypatch.setattr(FederatedModel, "evaluate", lambda self, *a: calls.append(1) or evaluate(self, *a))
    kw = {"glue_dir": glue_dir, "cache_dir": cache_dir}
    run(tmp_path / "shared", f"method={method}", "federation.rounds=1", **kw)
    assert len(calls) == distinct
    monkeypatch.setattr(ClientPayload, "same_as", lambda self, other: False)
    run(tmp_path / "each", f"method={method}", "federation.rounds=1", **kw)
    assert len(calls) == distinct + 4
    shared, each = (without_time(read_jsonl(tmp_path / x / "metrics.jsonl")) for x in ("shared", "each"))
    assert shared == each
    if distinct == 1:
        assert len({r["main_metric"] for r in shared}) == 1


def test_length_sorted_evaluation_scores_as_the_file_order_does(tmp_path: Path, glue_dir: Path, cache_dir: Path) -> None:
    """Serving evaluation examples longest first changes only the float rounding of padded products."""
    kw = {"glue_dir": glue_dir, "cache_dir": cache_dir}
    for name, sort in (("sorted", "true"), ("file", "false")):
        run(tmp_path / name, "federation.rounds=1", "data.eval_batch_size=8", f"data.eval_sort_by_length={sort}", **kw)
    by_order = [read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("sorted", "file")]
    for a, b in zip(*by_order, strict=True):
        assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
        assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], rel=1e-5)
        assert a["expert_entropy"] == pytest.approx(b["expert_entropy"], rel=1e-6)


def test_same_seed_same_metrics_other_seed_differs(tmp_path: Path, glue_dir: Path, cache_dir: Path) -> None:
    kw = {"glue_dir": glue_dir, "cache_dir": cache_dir}
    run(tmp_path / "a", "seed=7", **kw)
    run(tmp_path / "b", "seed=7", **kw)
    run(tmp_path / "c", "seed=8", **kw)
    a, b, c = (without_time(read_jsonl(tmp_path / x / "metrics.jsonl")) for x in "abc")
    assert a == b
    assert a != c
    assert read_jsonl(tmp_path / "a" / "experts.jsonl") == read_jsonl(tmp_path / "b" / "experts.jsonl")


def test_resume_equals_uninterrupted(tmp_path: Path, glue_dir: Path, cache_dir: Path) -> None:
    kw = {"glue_dir": glue_dir, "cache_dir": cache_dir}
    straight = run(tmp_path / "straight", "federation.rounds=4", **kw)
    run(tmp_path / "part", "federation.rounds=2", **kw)
    resumed = run(tmp_path / "resumed", "federation.rounds=4", f"resume={tmp_path / 'part'}", **kw)
    a = without_time(read_jsonl(tmp_path / "straight" / "metrics.jsonl"))
    b = without_time(read_jsonl(tmp_path / "resumed" / "metrics.jsonl"))
    assert [r["round"] for r in b] == [r["round"] for r in a]
    for ra, rb in zip(a, b, strict=True):
        for key in ra:
            if isinstance(ra[key], float):
                assert rb[key] == pytest.approx(ra[key], abs=1e-6), key
            elif key == "metrics" and ra[key]:
                assert rb[key] == pytest.approx(ra[key], abs=1e-6)
            else:
                assert rb[key] == ra[key], key
    assert resumed == pytest.approx(straight, abs=1e-6)
    # resume=true continues in place, from the run directory's own checkpoint
    run(tmp_path / "part", "federation.rounds=3", "resume=true", **kw)
    assert max(r["round"] for r in read_jsonl(tmp_path / "part" / "metrics.jsonl")) == 3


def test_resume_rejects_corrupt_or_incompatible_checkpoints(tmp_path: Path, glue_dir: Path, cache_dir: Path) -> None:
    from ubsmoe.errors import ConfigError

    kw = {"glue_dir": glue_dir, "cache_dir": cache_dir}
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="resume"):
        run(tmp_path / "x", f"resume={bad}", **kw)
    with pytest.raises(ConfigError, match="resume"):
        run(tmp_path / "y", "resume=true", **kw)
    run(tmp_path / "part", "federation.rounds=1", **kw)
    with pytest.raises(ConfigError, match="method.dmr.kappa"):
        run(tmp_path / "z", "method.dmr.kappa=3.0", f"resume={tmp_path / 'part'}", **kw)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("federation.clients_per_round=50", "federation.clients_per_round"),
        ("data.task=sst3", "data.task"),
        ("federation.dirichlet_alpha=0", "federation.dirichlet_alpha"),
        ("model.num_experts=7", "model.num_experts"),
    ],
)
def test_cli_bad_value_is_one_clear_message(tmp_path: Path, glue_dir: Path, override: str, key: str) -> None:
    proc = run_train_cli("experiment=smoke", override, f"paths.output_dir={tmp_path}", glue_dir=glue_dir, timeout=300)
    assert proc.returncode == 2
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
