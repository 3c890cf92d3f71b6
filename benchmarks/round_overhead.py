"""Round overhead and memory of the federated engine; writes logs/bench/round_overhead.json.

1. Overhead: the default experiment (experiment=glue_hetero) for a few rounds; from the
   run's timings.jsonl, the share of each round's wall time spent outside local training
   and evaluation (payload copies, aggregation, DMR, callbacks, metrics files, checkpoint).
   Target: under 5%.
2. Memory: peak RSS of one round with 1,000 clients against 10 clients (10 per round,
   both on the full SST-2 train split). Target: within 1.3x.

Each run is a fresh `python src/train.py` process, so peak RSS is that process's own.
Usage: python benchmarks/round_overhead.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "logs" / "bench" / "round_overhead.json"


def run_train(out_dir: Path, *overrides: str) -> float:
    """Run src/train.py in a child process; return its wall seconds."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "src/train.py", f"paths.output_dir={out_dir}", "logger=none", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def peak_rss_of(out_dir: Path, *overrides: str) -> int:
    """Peak RSS of a train run measured in a wrapper process (RUSAGE_CHILDREN is a running max)."""
    code = (
        "import resource, subprocess, sys; "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(p.stderr[-3000:]) if p.returncode else None; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if p.returncode == 0 else -1)"
    )
    cmd = [sys.executable, "src/train.py", f"paths.output_dir={out_dir}", "logger=none", *overrides]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    kib = int(proc.stdout.strip().splitlines()[-1])
    if kib < 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return kib * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "overhead"
        seconds = run_train(run_dir, "experiment=glue_hetero", f"federation.rounds={args.rounds}")
        timings = [json.loads(line) for line in (run_dir / "timings.jsonl").read_text().splitlines()]
        total = sum(t["round_seconds"] for t in timings)
        overhead = sum(t["overhead_seconds"] for t in timings)
        results["overhead"] = {
            "experiment": "glue_hetero",
            "rounds": args.rounds,
            "process_seconds": round(seconds, 2),
            "round_seconds": [t["round_seconds"] for t in timings],
            "overhead_seconds": [t["overhead_seconds"] for t in timings],
            "overhead_share": round(overhead / total, 4),
            "target_share": 0.05,
            "met": overhead / total < 0.05,
        }
        memory = {}
        for clients in (10, 1000):
            memory[clients] = peak_rss_of(
                Path(tmp) / f"mem{clients}",
                "experiment=glue_hetero",
                f"federation.num_clients={clients}",
                "federation.clients_per_round=10",
                "federation.rounds=1",
            )
        ratio = memory[1000] / memory[10]
        results["memory"] = {
            "peak_rss_bytes_10_clients": memory[10],
            "peak_rss_bytes_1000_clients": memory[1000],
            "ratio": round(ratio, 4),
            "target_ratio": 1.3,
            "met": ratio <= 1.3,
        }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
