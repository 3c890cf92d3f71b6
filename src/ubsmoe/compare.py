"""``make compare``: every method on the same split, seed and budget; one table per compute tier.

Runs ``python src/train.py experiment=compare method=NAME`` once per method (a fresh
process each, so no state leaks between methods), each into ``ROOT/NAME``, then reads
their ``metrics.jsonl`` and writes ``ROOT/comparison.md`` and ``ROOT/comparison.csv``: a
row per method, the task's main metric of each tier at the last evaluated round, the
mean over tiers, and the FLOPs of the weakest tier relative to the dense model.

With ``--centralized`` the table gets two more rows, the upper bounds: ``centralized``
(UB-SMoE on the pooled training data with the same examples per round, one run per tier at
that tier's K: ``federation=centralized``) and ``centralized_dense`` (FedIT on the pooled
data, the dense model).

Usage: python -m ubsmoe.compare [--methods a,b,...] [--centralized] [--root DIR] [HYDRA_OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ubsmoe.names import METHODS

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CENTRALIZED = "centralized"  # UB-SMoE on the pooled data, each tier trained and evaluated at its own K
CENTRALIZED_DENSE = "centralized_dense"  # FedIT on the pooled data: the dense model


def run_records(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl (one per round and tier)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run did not finish")
    return [json.loads(line) for line in path.read_text().splitlines()]


def last_evaluation(run_dir: Path) -> list[dict]:
    """The per-tier records of the last evaluated round of a run."""
    return last_evaluated(run_records(run_dir))


def last_evaluated(records: list[dict]) -> list[dict]:
    """Of a run's records, those of its last evaluated round (one per tier)."""
    evaluated = [r for r in records if r["evaluated"]]
    last = max(r["round"] for r in evaluated)
    return [r for r in evaluated if r["round"] == last]


def merge_runs(parts: list[Path], out_dir: Path) -> Path:
    """One run directory whose metrics.jsonl holds the records of all ``parts`` (one tier each)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for part in parts for line in (part / "metrics.jsonl").read_text().splitlines()]
    (out_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return out_dir


def run_centralized(
    root: Path, tiers: list[str], overrides: list[str], train: Callable[[list[str], Path], None]
) -> dict[str, Path]:
    """The two centralized rows: per-tier UB-SMoE runs merged into ``root/centralized``, and FedIT.

    ``train(overrides, run_dir)`` runs one training; ``overrides`` are the shared ones
    (experiment, seed, ...). The dense bound is trained as the last tier (FedIT has one shape).
    """
    parts = []
    for tier in tiers:
        part = root / "centralized_parts" / tier
        train([*overrides, "method=ubsmoe", "federation=centralized", f"federation.tier={tier}"], part)
        parts.append(part)
    dense = root / CENTRALIZED_DENSE
    train([*overrides, "method=fedit", "federation=centralized", f"federation.tier={tiers[-1]}"], dense)
    return {CENTRALIZED: merge_runs(parts, root / CENTRALIZED), CENTRALIZED_DENSE: dense}


def comparison_rows(run_dirs: dict[str, Path]) -> tuple[list[str], list[dict]]:
    """(tier names, one row per method) from the runs' last evaluations."""
    tiers: list[str] = []
    rows = []
    for method, run_dir in run_dirs.items():
        records = last_evaluation(run_dir)
        tiers = tiers or [r["tier"] for r in records]
        by_tier = {r["tier"]: r for r in records}
        if method == CENTRALIZED_DENSE:  # one dense model: the same number for every tier
            by_tier = {t: records[0] for t in tiers}
            records = [records[0]]
        weakest = min(records, key=lambda r: r["beta"])
        row = {"method": method, "round": records[0]["round"]}
        for tier in tiers:
            row[tier] = by_tier[tier]["main_metric"] if tier in by_tier else float("nan")
        row["mean"] = sum(row[t] for t in tiers) / len(tiers)
        row["weakest_flops_vs_dense"] = weakest["flops_ratio_to_dense"]
        rows.append(row)
    return tiers, rows


def write_tables(root: Path, tiers: list[str], rows: list[dict], title: str) -> tuple[Path, Path]:
    columns = ["method", *tiers, "mean", "weakest_flops_vs_dense", "round"]
    csv_path = write_csv(rows, root / "comparison.csv", columns=columns)
    lines = [
        f"# {title}",
        "",
        "| method | " + " | ".join(tiers) + " | mean over tiers | weakest-tier FLOPs / dense |",
        "|---|" + "---:|" * (len(tiers) + 2),
    ]
    for row in rows:
        cells = [f"{row[t]:.4f}" for t in tiers] + [f"{row['mean']:.4f}", f"{row['weakest_flops_vs_dense']:.3f}"]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    md_path = root / "comparison.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


class TrainingFailed(RuntimeError):
    def __init__(self, cmd: list[str], returncode: int) -> None:
        super().__init__(f"failed with exit code {returncode}: {' '.join(cmd)}")
        self.returncode = returncode


def train(overrides: list[str], run_dir: Path) -> None:
    """``python src/train.py OVERRIDES paths.output_dir=RUN_DIR`` in a fresh process; raises on failure."""
    cmd = [sys.executable, "src/train.py", *overrides, f"paths.output_dir={run_dir}"]
    print(f"[compare] {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=os.environ.copy())
    if proc.returncode != 0:
        raise TrainingFailed(cmd[1:], proc.returncode)
    print(f"[compare] finished in {time.perf_counter() - start:.0f} s", flush=True)


FINISHED = "run.done"  # written after a run finished; a later call on the same root keeps the run


def train_once(overrides: list[str], run_dir: Path, *, tag: str) -> None:
    """:func:`train` unless ``run_dir`` holds a finished run (an interrupted call is continued, not redone)."""
    if (run_dir / FINISHED).is_file():
        print(f"[{tag}] {run_dir} is complete: kept", flush=True)
        return
    train(overrides, run_dir)
    (run_dir / FINISHED).write_text("")


def write_csv(rows: list[dict], path: Path, *, columns: list[str] | None = None) -> Path:
    """``rows`` as a CSV file with a header (``columns``, default the first row's keys in order)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every method on the same split and tabulate per tier.")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    parser.add_argument("--root", type=Path, default=None, help="output root (default logs/compare/<time>)")
    parser.add_argument("--centralized", action="store_true", help="add the centralized upper-bound rows")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"Configuration error: --methods has {unknown}; allowed: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    root = args.root or PROJECT_ROOT / "logs" / "compare" / time.strftime("%Y-%m-%d_%H-%M-%S")
    root.mkdir(parents=True, exist_ok=True)
    run_dirs = {}
    try:
        for method in methods:
            run_dirs[method] = root / method
            train(["experiment=compare", f"method={method}", *args.overrides], run_dirs[method])
        if args.centralized:
            tiers = [r["tier"] for r in last_evaluation(run_dirs[methods[0]])]
            run_dirs.update(run_centralized(root, tiers, ["experiment=compare", *args.overrides], train))
    except TrainingFailed as err:
        print(f"[compare] {err}", file=sys.stderr)
        return err.returncode
    tiers, rows = comparison_rows(run_dirs)
    md, csv_path = write_tables(root, tiers, rows, f"Per-tier comparison ({' '.join(args.overrides) or 'experiment=compare'})")
    print(md.read_text())
    print(f"[compare] tables: {md} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
