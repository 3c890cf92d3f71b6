"""Killed at any moment: SIGKILL mid-round, SIGKILL mid-checkpoint-write, SIGTERM; resume=true ends where
an uninterrupted run ends (1e-6), and SIGTERM prints the exact command that does it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ubsmoe.fl.checkpoint import PAUSE_ENV, load_checkpoint, round_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 4
TINY = (
    "experiment=smoke",
    "federation.num_clients=6",
    "federation.clients_per_round=3",
    f"federation.rounds={ROUNDS}",
    "federation.local_steps=2",
    "data.max_train_examples=240",
    "data.max_eval_examples=32",
    "logger=none",
    "seed=4",
    "federation.faults.fail=0.3",
    "federation.faults.nonfinite=0.2",
)


def env(pause: str | None = None) -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    out.pop(PAUSE_ENV, None)
    if pause:
        out[PAUSE_ENV] = pause
    return out


def command(out: Path, glue_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "src/train.py", *TINY, f"paths.output_dir={out}", f"data.local_dir={glue_dir}",
            f"paths.cache_dir={cache_dir}", *extra]  # fmt: skip


def run_to_end(cmd: list[str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, log.read_text()[-4000:]


def run_until_paused(cmd: list[str], pause: str, marker: Path, log: Path, sig: int) -> tuple[int, str]:
    """Start ``cmd`` with the test pause hook, wait until it sits at ``pause``, send ``sig``; (returncode, output)."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(pause), stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"never reached {pause}:\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
    return code, log.read_text()


def metrics(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [(r["round"], r["tier"]) for r in b] == [(r["round"], r["tier"]) for r in a]
    for ra, rb in zip(a, b, strict=True):
        for key, value in ra.items():
            if isinstance(value, float) or (key == "metrics" and value):
                assert rb[key] == pytest.approx(value, abs=1e-6), (ra["round"], key)
            else:
                assert rb[key] == value, (ra["round"], key)


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path: Path, glue_dir: Path, cache_dir: Path) -> None:
    reference = tmp_path / "reference"
    run_to_end(command(reference, glue_dir, cache_dir), tmp_path / "reference.log")
    # checkpoints hold what training changes, not the frozen backbone (it was 90 MB)
    assert (reference / "checkpoints" / "last.ckpt").stat().st_size < 5_000_000

    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    # 1. SIGKILL in the middle of round 2 (after local training, before aggregation)
    code, _ = run_until_paused(command(out, glue_dir, cache_dir), "round:2", out / "paused-round-2",
                               tmp_path / "1.log", signal.SIGKILL)  # fmt: skip
    assert code == -signal.SIGKILL
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "round-000001.ckpt"]

    # 2. resume, then SIGKILL half way through writing round 3's checkpoint
    tmp = ckpts / "round-000003.ckpt.tmp"
    code, _ = run_until_paused(command(out, glue_dir, cache_dir, "resume=true"), "write:3",
                               tmp.with_name(tmp.name + ".paused"), tmp_path / "2.log", signal.SIGKILL)  # fmt: skip
    assert code == -signal.SIGKILL
    assert tmp.stat().st_size > 0 and not round_file(ckpts, 3).exists()
    assert load_checkpoint(ckpts / "last.ckpt")["server"]["round"] == 2  # the previous one is intact

    # 3. resume, then SIGTERM during round 4: the round is abandoned, the exact resume command printed
    code, output = run_until_paused(command(out, glue_dir, cache_dir, "resume=true"), "round:4",
                                    out / "paused-round-4", tmp_path / "3.log", signal.SIGTERM)  # fmt: skip
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "Interrupted by SIGTERM" in output and "Traceback" not in output
    assert not tmp.exists() and not list(ckpts.glob("*.tmp*"))
    assert f"Last checkpoint: {round_file(ckpts, 3)}" in output
    printed = output.split("Resume with:", 1)[1].strip().splitlines()[0]
    resume = shlex.split(printed)
    assert resume[-1] == "resume=true" and f"paths.output_dir={out}" in resume

    # 4. the printed command finishes the run; it ends as the uninterrupted one did
    run_to_end(resume, tmp_path / "4.log")
    assert_same_metrics(metrics(reference), metrics(out))
    assert (out / "faults.jsonl").read_text() == (reference / "faults.jsonl").read_text()
    assert (out / "experts.jsonl").read_text() == (reference / "experts.jsonl").read_text()
    assert [json.loads(x)["round"] for x in (out / "timings.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
