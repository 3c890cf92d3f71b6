"""Every method runs two rounds of the smoke experiment end to end, and `make compare` tabulates them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import compose_config

from ubsmoe.compare import comparison_rows, write_tables
from ubsmoe.names import METHODS
from ubsmoe.runner import run_experiment

pytestmark = pytest.mark.slow

TINY = (
    "experiment=smoke",
    "federation.num_clients=4",
    "federation.clients_per_round=4",
    "federation.local_steps=1",
    "federation.rounds=2",
    "data.max_train_examples=160",
    "data.max_eval_examples=16",
    "logger=none",
)


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path, cache_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods")
    runs = {}
    for method in METHODS:
        cfg = compose_config(
            *TINY, f"method={method}", f"paths.output_dir={root / method}", f"data.local_dir={glue_dir}",
            f"paths.cache_dir={cache_dir}",
        )  # fmt: skip
        run_experiment(cfg)
        runs[method] = root / method
    return runs


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_two_rounds_on_every_tier(method_runs: dict[str, Path], method: str) -> None:
    rows = records(method_runs[method])
    assert [(r["round"], r["tier"]) for r in rows] == [
        (rnd, tier) for rnd in (1, 2) for tier in ("t25", "t50", "t75", "t100")
    ]
    assert all(r["evaluated"] and r["method"] == method for r in rows)
    # without injected faults every reply passes the server's checks (keys, shapes, dtypes, finite)
    assert all(r["dropped_clients"] == 0 and not r["skipped"] for r in rows)
    assert (method_runs[method] / "faults.jsonl").read_text() == ""
    final = rows[-4:]
    if method in ("ubsmoe", "smoe", "smoe_llb", "flame"):
        assert [r["k"] for r in final] == [2, 4, 6, 8]
        assert final[0]["flops_ratio_to_dense"] < 0.6  # the weakest tier really computes less
    else:
        assert all(r["k"] is None for r in final)
        expected = [2, 4, 6, 8] if method in ("hetlora", "flexlora", "flora", "florist") else [None] * 4
        assert [r["rank"] for r in final] == expected
        assert final[0]["flops_ratio_to_dense"] > 0.95  # a smaller rank saves almost nothing
    sent = sum(r["bytes_sent"] for r in rows)
    assert sent > 0


def test_rank_methods_send_weak_clients_less(method_runs: dict[str, Path]) -> None:
    rows = [r for r in records(method_runs["hetlora"]) if r["num_clients"] == 1]
    per_tier = {r["tier"]: r["bytes_sent"] for r in rows}
    assert per_tier["t25"] < per_tier["t100"]


def test_comparison_table(method_runs: dict[str, Path], tmp_path: Path) -> None:
    tiers, rows = comparison_rows(method_runs)
    assert tiers == ["t25", "t50", "t75", "t100"]
    assert [r["method"] for r in rows] == list(METHODS)
    for row in rows:
        assert row["mean"] == pytest.approx(sum(row[t] for t in tiers) / 4)
    md, csv_path = write_tables(tmp_path, tiers, rows, "test")
    text = md.read_text()
    assert all(f"| {m} |" in text for m in METHODS)
    assert len(csv_path.read_text().splitlines()) == len(METHODS) + 1
