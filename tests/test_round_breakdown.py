"""benchmarks/round_breakdown.py tabulates finished runs from their timings.jsonl without training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _phases(clients: float, evaluate: float) -> dict[str, float]:
    return {"clients": clients, "aggregate": 0.1, "evaluate": evaluate, "round_end_callbacks": 0.0,
            "checkpoint": 0.2, "other": 0.0}  # fmt: skip


def _run(root: Path, method: str) -> Path:
    run = root / method
    run.mkdir()
    rounds = [
        {"round": 1, "round_seconds": 10.3, "phases": _phases(10.0, 0.0), "setup_seconds": {"data": 1.0, "model": 2.0, "engine": 0.5},
         "tiers": {"t25": {"clients": 2, "steps": 4, "train_seconds_per_step": 1.0}, "t100": {"clients": 0, "steps": 0, "train_seconds_per_step": None}}},
        {"round": 2, "round_seconds": 18.3, "phases": _phases(12.0, 6.0),
         "tiers": {"t25": {"clients": 1, "steps": 2, "train_seconds_per_step": 4.0}, "t100": {"clients": 1, "steps": 2, "train_seconds_per_step": 2.0}}},
        {"round": 3, "round_seconds": 12.3, "phases": _phases(6.0, 6.0),
         "tiers": {"t25": {"clients": 0, "steps": 0, "train_seconds_per_step": None}, "t100": {"clients": 1, "steps": 2, "train_seconds_per_step": 3.0}}},
    ]  # fmt: skip
    (run / "timings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "tier": "t25", "method": method}) + "\n")
    return run


def test_finished_runs_are_tabulated_per_round_per_evaluation_and_per_step(tmp_path: Path) -> None:
    runs = [_run(tmp_path, "ubsmoe"), _run(tmp_path, "fedit")]
    proc = subprocess.run(
        [sys.executable, "benchmarks/round_breakdown.py", "--runs", *map(str, runs)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| ubsmoe |", "| fedit |"))]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    # setup; clients 28 s over 3 rounds; evaluation 12 s over the 2 rounds that evaluated;
    # t25: (4 x 1.0 + 2 x 4.0) s over 6 steps, t100: (2 x 2.0 + 2 x 3.0) s over 4 steps
    assert cells[1] == "1.0/2.0/0.5"
    assert cells[2] == "9.33" and cells[4] == "6.00"
    assert cells[-2:] == ["2.000", "2.500"]


def test_a_run_without_setup_seconds_is_refused_by_name(tmp_path: Path) -> None:
    run = _run(tmp_path, "ubsmoe")
    lines = [json.loads(line) for line in (run / "timings.jsonl").read_text().splitlines()]
    del lines[0]["setup_seconds"]
    (run / "timings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    proc = subprocess.run([sys.executable, "benchmarks/round_breakdown.py", "--runs", str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and f"{run}: timings.jsonl has no setup_seconds" in proc.stderr


def test_runs_with_training_options_is_refused_before_any_work(tmp_path: Path) -> None:
    run = _run(tmp_path, "ubsmoe")
    proc = subprocess.run([sys.executable, "benchmarks/round_breakdown.py", "--rounds", "3", "--runs", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--runs: tabulates finished runs" in proc.stderr and "--rounds" in proc.stderr
    assert "| ubsmoe |" not in proc.stdout
