"""Shared by the Flower tests: compare two run directories, tiny federations, stub ClientApps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# The smoke experiment, smaller still (as in test_train_e2e): every run here trains for real.
TINY = (
    "experiment=smoke",
    "federation.num_clients=6",
    "federation.clients_per_round=2",
    "federation.local_steps=2",
    "data.max_train_examples=240",
    "data.max_eval_examples=32",
    "logger=none",
    # one torch thread everywhere: a Ray worker or a SuperNode process trains with one, and
    # float32 sums in another order can flip a near-tie in top-K routing (then the runs part)
    "fabric.num_threads=1",
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_close_values(a: object, b: object, where: str) -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, abs=1e-6), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_close_values(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close_values(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_metrics(run_a: Path, run_b: Path) -> None:
    """metrics.jsonl of two runs agree to 1e-6 in every field but the wall time."""
    a, b = read_jsonl(run_a / "metrics.jsonl"), read_jsonl(run_b / "metrics.jsonl")
    assert a and [(r["round"], r["tier"]) for r in a] == [(r["round"], r["tier"]) for r in b]
    for ra, rb in zip(a, b, strict=True):
        ra = {k: v for k, v in ra.items() if k != "wall_time"}
        rb = {k: v for k, v in rb.items() if k != "wall_time"}
        _assert_close_values(ra, rb, f"round {ra['round']} tier {ra['tier']}")


def final_server_state(run: Path) -> dict:
    from ubsmoe.fl.checkpoint import CHECKPOINT_FILE, load_checkpoint

    return load_checkpoint(run / CHECKPOINT_FILE)["server"]  # checksum-verified, weights_only


def assert_same_final_state(run_a: Path, run_b: Path) -> None:
    """The final checkpoint's global state (and PG defaults, round) of two runs agree."""
    a, b = final_server_state(run_a), final_server_state(run_b)
    assert a["round"] == b["round"]
    for key in ("global_state", "pg_defaults"):
        assert set(a[key]) == set(b[key])
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-6, atol=1e-6, msg=name)
