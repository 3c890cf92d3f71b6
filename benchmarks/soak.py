"""Soak test of the federated engine under injected faults; writes logs/bench/soak.json.

Runs the smoke experiment (experiment=smoke: 8 clients, 4 a round) for 200 rounds, with a
smaller budget per round so it fits on a laptop (1 local step of batch 8, sequences of 32
tokens, evaluation every 10 rounds, so round 20 has already seen evaluation's memory peak),
and with 20% of the sampled clients faulty (5% each: crash, non-finite tensors, wrong shapes, stragglers past
``federation.round_timeout``), in a child ``python src/train.py`` process, and checks:

- it completes every round, and no metric or global tensor is non-finite;
- memory: peak RSS (VmHWM of the child) after round 20 grows by less than 5% by the end
  (the JSON also keeps the current RSS at every 10th round, to tell a leak from a peak);
- time: the mean round time of rounds 21-40 and of the last 20 rounds are within 20%
  (evaluation rounds are left out of both); on a shared machine the training part follows
  the load of the other processes, so the JSON also compares the engine's own overhead
  (round time outside local training and evaluation) early and late.

Usage: python benchmarks/soak.py [--rounds 200] [--eval-every 10]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "logs" / "bench" / "soak.json"
FAULTS = {"fail": 0.05, "nonfinite": 0.05, "bad_shape": 0.05, "straggler": 0.05}
MEMORY_GROWTH_LIMIT = 0.05
TIME_RATIO_LIMIT = 1.2
WARMUP_ROUND = 20


def peak_rss(pid: int) -> int | None:
    """VmHWM (peak resident set) of a running process, in bytes (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss(pid: int) -> int | None:
    """VmRSS (resident set now) of a running process, in bytes (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rounds_done(run_dir: Path) -> int:
    path = run_dir / "timings.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def all_finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    return True


def checkpoint_finite(run_dir: Path) -> bool:
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from ubsmoe.fl.checkpoint import load_checkpoint

    server = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["server"]
    tensors = [*server["global_state"].values(), *server["pg_defaults"].values(), *server["utilization"].values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--run-dir", type=Path, default=None, help="keep the run here (default: a temporary dir)")
    args = parser.parse_args()

    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    overrides = [
        "experiment=smoke", "logger=none", f"federation.rounds={args.rounds}", "federation.local_steps=1",
        "data.batch_size=8", "data.max_length=32",
        f"federation.eval_every={args.eval_every}", "federation.round_timeout=60",
        *(f"federation.faults.{k}={v}" for k, v in FAULTS.items()), f"paths.output_dir={run_dir}",
    ]  # fmt: skip
    cmd = [sys.executable, "src/train.py", *overrides]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    log = run_dir.with_name(run_dir.name + ".log")
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        rss_at_warmup = None
        rss_last = None
        trace: dict[int, int] = {}  # round -> current RSS, every 10th round
        while proc.poll() is None:
            rss = peak_rss(proc.pid)
            rss_last = rss or rss_last
            done = rounds_done(run_dir)
            if rss_at_warmup is None and done >= WARMUP_ROUND:
                rss_at_warmup = rss
            if done and done % 10 == 0 and done not in trace:
                now = current_rss(proc.pid)
                if now:
                    trace[done] = now
            time.sleep(0.2)
    wall = time.perf_counter() - start

    timings = [json.loads(x) for x in (run_dir / "timings.jsonl").read_text().splitlines()] if (
        run_dir / "timings.jsonl"
    ).is_file() else []
    completed = len(timings)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    faults = [json.loads(x) for x in (run_dir / "faults.jsonl").read_text().splitlines()]
    train_rounds = [t for t in timings if t["round"] % args.eval_every != 0 and t["round"] != args.rounds]
    early = [t["round_seconds"] for t in train_rounds if WARMUP_ROUND < t["round"] <= 2 * WARMUP_ROUND]
    late = [t["round_seconds"] for t in train_rounds if t["round"] > completed - WARMUP_ROUND]
    early_overhead = [t["overhead_seconds"] for t in train_rounds if WARMUP_ROUND < t["round"] <= 2 * WARMUP_ROUND]
    late_overhead = [t["overhead_seconds"] for t in train_rounds if t["round"] > completed - WARMUP_ROUND]
    early_mean = statistics.mean(early) if early else None
    late_mean = statistics.mean(late) if late else None
    growth = (rss_last - rss_at_warmup) / rss_at_warmup if rss_at_warmup and rss_last else None
    ratio = late_mean / early_mean if early_mean and late_mean else None
    finite = all_finite(metrics) and proc.returncode == 0 and checkpoint_finite(run_dir)
    per_round = 4  # experiment=smoke samples 4 clients a round
    result = {
        "command": " ".join(cmd),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "returncode": proc.returncode,
        "rounds_requested": args.rounds,
        "rounds_completed": completed,
        "wall_seconds": round(wall, 1),
        "faults_injected": FAULTS,
        "dropped_clients": len(faults),
        "dropped_fraction": round(len(faults) / max(per_round * completed, 1), 4),
        "dropped_by_kind": {k: sum(1 for r in faults if r["kind"] == k) for k in sorted({r["kind"] for r in faults})},
        "skipped_rounds": sorted({r["round"] for r in metrics if r.get("skipped")}),
        "all_finite": finite,
        "peak_rss_after_round_20": rss_at_warmup,
        "peak_rss_at_end": rss_last,
        "peak_rss_growth": None if growth is None else round(growth, 4),
        "round_seconds_rounds_21_40": None if early_mean is None else round(early_mean, 4),
        "round_seconds_last_20": None if late_mean is None else round(late_mean, 4),
        "round_time_ratio": None if ratio is None else round(ratio, 3),
        "overhead_seconds_rounds_21_40": round(statistics.mean(early_overhead), 4) if early_overhead else None,
        "overhead_seconds_last_20": round(statistics.mean(late_overhead), 4) if late_overhead else None,
        "current_rss_by_round": {str(k): v for k, v in sorted(trace.items())},
        "targets": {
            "completes": completed == args.rounds and proc.returncode == 0,
            "no_nonfinite": finite,
            "rss_growth_below_5pct": growth is not None and growth < MEMORY_GROWTH_LIMIT,
            "time_per_round_flat_within_20pct": ratio is not None and ratio < TIME_RATIO_LIMIT,
        },
        "run_dir": str(run_dir),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if proc.returncode != 0:
        sys.exit(f"the soak run failed; see {log}")


if __name__ == "__main__":
    main()
