"""Flower (Ray simulation) against the local backend on the same rounds; writes logs/bench/backend_overhead.json.

1. Per-round wall time of ``experiment=glue_hetero`` for a few rounds under
   ``backend=local`` and ``backend=flower`` (Ray, ``--workers`` actors of one CPU), each in
   a fresh ``python src/train.py`` process, from the runs' ``timings.jsonl``. The first
   Flower round includes every worker building its model and data once; it is reported
   apart from the later (steady-state) rounds, which the target compares: flower within
   1.5x of local per round.
2. Ray start-up on its own: ``ray.init`` (as the simulation configures it) to ready, and
   shutdown, in a fresh process.
3. Bytes per client per round: as Flower encodes the messages (every distinct deflated
   object) against the strategy's own count, from the Flower run's ``flower_bytes.jsonl``.

Usage: python benchmarks/backend_overhead.py [--rounds N] [--workers W] [ARGS for both runs ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "logs" / "bench" / "backend_overhead.json"
TARGET = 1.5

RAY_START = """
import time
from ubsmoe.fl.backends.flower_env import prepare_flower_env
prepare_flower_env()
from ubsmoe.fl.backends.flower import FlowerBackend, ray_backend_config
import ray
init = ray_backend_config(FlowerBackend(num_workers={workers}))["init_args"]
t0 = time.perf_counter(); ray.init(**init); ready = time.perf_counter() - t0
t1 = time.perf_counter(); ray.shutdown(); down = time.perf_counter() - t1
print(f"{{ready}} {{down}}")
"""


def env() -> dict[str, str]:
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def run_train(out_dir: Path, *overrides: str) -> float:
    cmd = [sys.executable, "src/train.py", f"paths.output_dir={out_dir}", "logger=none", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = parser.parse_args()
    common = ["experiment=glue_hetero", f"federation.rounds={args.rounds}", *args.overrides]
    results: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "experiment": common,
        "workers": args.workers,
        # torch threads of the local run and of the server process; each Ray worker gets its client_cpus (1)
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset (torch default)"),
        "load_average_at_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, extra in (
            ("local", []),
            ("flower", ["backend=flower", "backend.mode=simulation", f"backend.num_workers={args.workers}"]),
        ):
            out = Path(tmp) / name
            seconds = run_train(out, *common, *extra)
            rounds = [t["round_seconds"] for t in read_jsonl(out / "timings.jsonl")]
            runs[name] = {"process_seconds": round(seconds, 2), "round_seconds": rounds}
        local, flower = runs["local"], runs["flower"]
        steady_local = mean(local["round_seconds"][1:] or local["round_seconds"])
        steady_flower = mean(flower["round_seconds"][1:] or flower["round_seconds"])
        ratio = steady_flower / steady_local
        results["per_round"] = {
            "local": local,
            "flower": flower,
            "first_round_ratio": round(flower["round_seconds"][0] / local["round_seconds"][0], 3),
            "steady_round_seconds": {"local": round(steady_local, 3), "flower": round(steady_flower, 3)},
            "steady_ratio": round(ratio, 3),
            "target_ratio": TARGET,
            "met": ratio <= TARGET,
            "outside_rounds_extra_seconds": round(
                (flower["process_seconds"] - sum(flower["round_seconds"]))
                - (local["process_seconds"] - sum(local["round_seconds"])),
                2,
            ),
        }
        probe = subprocess.run(
            [sys.executable, "-c", RAY_START.format(workers=args.workers)],
            cwd=ROOT, env=env(), capture_output=True, text=True,
        )  # fmt: skip
        if probe.returncode == 0:
            ready, down = (float(x) for x in probe.stdout.split()[-2:])
            results["ray_startup"] = {"init_seconds": round(ready, 3), "shutdown_seconds": round(down, 3)}
        else:
            results["ray_startup"] = {"error": probe.stderr[-1000:]}
        traffic = read_jsonl(Path(tmp) / "flower" / "flower_bytes.jsonl")
        if traffic:
            keys = ("down_flower", "down_project", "up_flower", "up_project")
            per = {k: round(mean(r[k] for r in traffic)) for k in keys}
            results["bytes_per_client_round"] = {
                **per,
                "down_ratio": round(per["down_flower"] / per["down_project"], 4),
                "up_ratio": round(per["up_flower"] / per["up_project"], 4),
                "samples": len(traffic),
            }
    results["load_average_at_end"] = os.getloadavg()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
