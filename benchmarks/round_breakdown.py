"""Where a round's time goes, per method; writes logs/bench/round_breakdown.json.

Each method runs the chosen experiment (default ``experiment=compare``) for a few rounds in
its own ``python src/train.py`` process, evaluating in the last round, and its
``timings.jsonl`` is summed: the process's setup (data, model with its MoEfication, engine)
and, per round, the phases (local training of the clients, aggregation, evaluation,
on_round_end callbacks, checkpoint, the rest) with each tier's seconds per local step.
``--profile`` also runs every child under cProfile and keeps the functions with the most
time of their own (``tottime``), which is what says *why* a phase costs what it does.

Usage: python benchmarks/round_breakdown.py [--experiment compare] [--methods ubsmoe,fedit]
       [--rounds 2] [--profile] [--out logs/bench/round_breakdown.json] [override ...]
       python benchmarks/round_breakdown.py --runs RUN_DIR [RUN_DIR ...]   (finished runs, no training)
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ubsmoe.names import METHODS

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("clients", "aggregate", "evaluate", "round_end_callbacks", "checkpoint", "other")


def run_method(method: str, out_dir: Path, args: argparse.Namespace) -> dict:
    """Train one method in a child process; return its summed timings (and profile, if asked)."""
    overrides = [
        f"experiment={args.experiment}", f"method={method}", f"federation.rounds={args.rounds}",
        f"federation.eval_every={args.rounds}", "logger=none", f"paths.output_dir={out_dir}", *args.overrides,
    ]  # fmt: skip
    profile = out_dir.parent / f"{method}.prof"
    launcher = ["-m", "cProfile", "-o", str(profile)] if args.profile else []
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *launcher, "src/train.py", *overrides], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"method={method} failed:\n{proc.stderr[-3000:]}")
    result = summarize_timings(out_dir, process_seconds=time.perf_counter() - start)
    if args.profile:
        result["profile_top"] = top_functions(profile, 15)
    return result


def summarize_timings(run_dir: Path, *, process_seconds: float | None = None) -> dict:
    """A run's timings.jsonl summed: setup, seconds per phase, evaluations, s per local step by tier."""
    records = [json.loads(line) for line in (run_dir / "timings.jsonl").read_text().splitlines()]
    if "setup_seconds" not in records[0]:
        sys.exit(f"{run_dir}: timings.jsonl has no setup_seconds (a resumed run, or one older than the phases)")
    steps: dict[str, list[float]] = {}
    for record in records:
        for tier, cost in record["tiers"].items():
            if cost["clients"]:
                steps.setdefault(tier, []).append(cost["train_seconds_per_step"] * cost["steps"])
                steps.setdefault(f"{tier}_steps", []).append(cost["steps"])
    tiers = sorted({t for t in steps if not t.endswith("_steps")}, key=lambda t: list(records[0]["tiers"]).index(t))
    return {
        "process_seconds": None if process_seconds is None else round(process_seconds, 2),
        "setup_seconds": records[0]["setup_seconds"],
        "rounds": len(records),
        "evaluations": sum(1 for r in records if r["phases"]["evaluate"] > 0),
        "round_seconds": [r["round_seconds"] for r in records],
        "phase_seconds": {p: round(sum(r["phases"][p] for r in records), 3) for p in PHASES},
        "train_seconds_per_step": {t: round(sum(steps[t]) / sum(steps[f"{t}_steps"]), 4) for t in tiers},
    }


def method_of(run_dir: Path) -> str:
    """The method a finished run trained, from the first record of its metrics.jsonl."""
    with (run_dir / "metrics.jsonl").open() as f:
        return json.loads(f.readline())["method"]


def top_functions(profile: Path, count: int) -> list[dict]:
    """The functions with the most time of their own in a cProfile file."""
    stats = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:count]
    return [
        {"function": f"{Path(file).name}:{line}({name})", "calls": calls, "tottime": round(tottime, 3),
         "cumtime": round(cumtime, 3)}
        for (file, line, name), (_, calls, tottime, cumtime, _) in rows
    ]  # fmt: skip


def table(results: dict[str, dict]) -> str:
    """A markdown table: setup, each phase's seconds per round (evaluation: per evaluation), s per step by tier."""
    first = next(iter(results.values()))
    tiers = list(first["train_seconds_per_step"])
    for r in results.values():
        tiers += [t for t in r["train_seconds_per_step"] if t not in tiers]
    phase_heads = [("evaluate s/evaluation" if p == "evaluate" else f"{p} s/round") for p in PHASES]
    head = ["method", "setup s (data/model/engine)", *phase_heads, *(f"{t} s/step" for t in tiers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in results.items():
        setup = "/".join(f"{r['setup_seconds'][k]:.1f}" for k in ("data", "model", "engine"))
        phases = [f"{r['phase_seconds'][p] / (max(r['evaluations'], 1) if p == 'evaluate' else r['rounds']):.2f}"
                  for p in PHASES]  # fmt: skip
        per_step = [f"{r['train_seconds_per_step'].get(t, float('nan')):.3f}" for t in tiers]
        lines.append("| " + " | ".join([method, setup, *phases, *per_step]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="compare")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=2, help="rounds per method; only the last one evaluates")
    parser.add_argument("--profile", action="store_true", help="run each child under cProfile")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench" / "round_breakdown.json")
    parser.add_argument("--runs", type=Path, nargs="+", default=None,
                        help="tabulate these finished run directories instead of training (the method from each "
                             "run's metrics.jsonl)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    if args.runs:
        ignored = [f"--{k}" for k in ("experiment", "methods", "rounds", "profile", "out")
                   if getattr(args, k) != parser.get_default(k)] + (["overrides"] if args.overrides else [])  # fmt: skip
        if ignored:
            parser.error(f"--runs: tabulates finished runs and trains nothing, so {', '.join(ignored)} would be ignored; "
                         "allowed with --runs: run directories only")
        print(table({method_of(run): summarize_timings(run) for run in args.runs}))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
    if args.rounds < 1:
        parser.error(f"--rounds: {args.rounds}; allowed: an integer >= 1")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            results[method] = run_method(method, Path(tmp) / method, args)
            print(f"{method}: {results[method]['process_seconds']} s", flush=True)
    report = {"experiment": args.experiment, "rounds": args.rounds, "overrides": args.overrides,
              "load_average_at_end": os.getloadavg(), "methods": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
