"""The smoke federation under client-level DP: no noise and a huge clip change nothing, epsilon per round, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import compose_config

from ubsmoe.fl.checkpoint import CHECKPOINT_DIR, load_checkpoint, round_file
from ubsmoe.privacy.accountant import epsilon_after
from ubsmoe.runner import run_experiment

pytestmark = pytest.mark.slow

NUM_CLIENTS, PER_ROUND = 6, 3
TINY = (
    "experiment=smoke",
    "method=fedit",
    "federation.partition=iid",  # equal n_c: DP's equal weights are FedAvg's weights
    f"federation.num_clients={NUM_CLIENTS}",
    f"federation.clients_per_round={PER_ROUND}",
    "federation.local_steps=2",
    "data.max_train_examples=240",
    "data.max_eval_examples=32",
    "logger=none",
)


def run(out: Path, *overrides: str, glue_dir: Path, cache_dir: Path) -> list[dict]:
    cfg = compose_config(
        *TINY, f"paths.output_dir={out}", f"data.local_dir={glue_dir}", f"paths.cache_dir={cache_dir}", *overrides
    )
    run_experiment(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_no_noise_and_a_huge_clip_equal_the_run_without_dp(tmp_path: Path, glue_dir: Path, cache_dir: Path) -> None:
    kw = {"glue_dir": glue_dir, "cache_dir": cache_dir}
    plain = run(tmp_path / "plain", "federation.rounds=1", **kw)
    private = run(
        tmp_path / "dp", "federation.rounds=1", "privacy=fixed", "privacy.noise_multiplier=0", "privacy.clip_norm=1e9",
        **kw,
    )  # fmt: skip
    assert len(plain) == len(private)
    for a, b in zip(plain, private, strict=True):
        assert b["metrics"] == pytest.approx(a["metrics"], rel=1e-5, abs=1e-6)
        assert b["epsilon"] is None and b["dp_noise_multiplier"] == 0.0  # no noise: no bound
        assert "epsilon" not in a


def test_epsilon_every_round_and_resume_keeps_the_accountant(tmp_path: Path, glue_dir: Path, cache_dir: Path) -> None:
    kw = {"glue_dir": glue_dir, "cache_dir": cache_dir}
    dp = ("privacy=fixed", "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.5")
    straight = run(tmp_path / "straight", "federation.rounds=2", *dp, **kw)
    q = PER_ROUND / NUM_CLIENTS
    for record in straight:
        assert record["epsilon"] == pytest.approx(epsilon_after(q, 0.8, record["round"], 1e-5), rel=1e-9)
    checkpoint = load_checkpoint(round_file(tmp_path / "straight" / CHECKPOINT_DIR, 2))
    assert checkpoint["callbacks"]["PrivacyReport"]["ledger"]["events"] == [[q, 0.8, 2]]
    # resume from round 1 (a copy of the run directory that kept only that checkpoint)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "straight", part)
    round_file(part / CHECKPOINT_DIR, 2).unlink()
    resumed = run(part, "federation.rounds=2", "resume=true", *dp, **kw)
    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in straight]
    again = [{k: v for k, v in r.items() if k != "wall_time"} for r in resumed]
    assert [r["round"] for r in again] == [r["round"] for r in strip]
    for a, b in zip(strip, again, strict=True):
        assert b["epsilon"] == a["epsilon"]
        assert b["metrics"] == pytest.approx(a["metrics"], abs=1e-6)
