"""``make ablation``: UB-SMoE with one mechanism changed at a time, on one seed, tabulated per tier.

Each variant is ``python src/train.py experiment=BUDGET method=ubsmoe seed=S diagnostics.every=E
OVERRIDES`` in a fresh process, into ``ROOT/<variant>`` (default ``logs/ablation/<time>``);
``ROOT/ablation.md`` and ``ablation.csv`` get, per variant and tier, the main metric of the
last evaluated round and the expert-gradient bias with PG's direction off and on
(``grad_bias``, ``grad_bias_pg``, see :mod:`ubsmoe.callbacks.grad_bias`) at that round.

The variants change one switch of the default UB-SMoE each (a full factorial grid of five
binary switches is 32 runs; one-at-a-time reads each mechanism against the same reference):

- ``full``: the default method;
- ``no_dmr``: DMR off (no phi, no candidate restriction);
- ``pg_router``: PG's router signal on (the project's addition, off by default as in the
  paper; L * M * h floats each way);
- ``no_pg_expert``: PG's expert signal off (the paper's PG; with the router signal off by
  default, no PG at all);
- ``np_2`` / ``np_8``: the candidate set N_p = 2 or 8 (= M: phi biases every expert) instead of 4.

Usage: python -m ubsmoe.ablation [--variants a,b] [--seed 42] [--budget compare] [--root DIR]
       [--every 3] [HYDRA_OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ubsmoe.compare import TrainingFailed, last_evaluation, train_once, write_csv

PROJECT_ROOT = Path(__file__).resolve().parents[2]
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no_dmr": ["method.dmr.enabled=false"],
    "pg_router": ["method.pg.router=true"],
    "no_pg_expert": ["method.pg.expert=false"],
    "np_2": ["method.dmr.num_candidates=2"],
    "np_8": ["method.dmr.num_candidates=8"],
}


def rows_of(run_dirs: dict[str, Path]) -> list[dict]:
    """One row per (variant, tier) from each run's last evaluated round."""
    rows = []
    for variant, run_dir in run_dirs.items():
        for record in last_evaluation(run_dir):
            rows.append({
                "variant": variant, "overrides": " ".join(VARIANTS.get(variant, [])), "tier": record["tier"],
                "k": record["k"], "round": record["round"], "main_metric": record["main_metric"],
                "grad_bias": record.get("grad_bias"), "grad_bias_pg": record.get("grad_bias_pg"),
            })  # fmt: skip
    return rows


def _cell(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_tables(rows: list[dict], root: Path, *, title: str) -> tuple[Path, Path]:
    """``ablation.csv`` (every row) and ``ablation.md`` (metric per tier and mean; bias per tier)."""
    csv_path = write_csv(rows, root / "ablation.csv")
    tiers = list(dict.fromkeys(r["tier"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["tier"]): r for r in rows}
    lines = [f"# {title}", "", "Main metric of the last evaluated round, per tier:", "",
             "| variant | overrides | " + " | ".join(tiers) + " | mean |", "|---|---|" + "---:|" * (len(tiers) + 1)]  # fmt: skip
    for v in variants:
        values = [cell[(v, t)]["main_metric"] for t in tiers if (v, t) in cell]
        mean = sum(values) / len(values) if values else None
        lines.append(f"| {v} | `{' '.join(VARIANTS.get(v, [])) or '-'}` | "
                     + " | ".join(_cell(cell[(v, t)]["main_metric"]) if (v, t) in cell else "-" for t in tiers)
                     + f" | {_cell(mean)} |")  # fmt: skip
    lines += ["", "Expert-gradient bias at that round, ||g_K - g_M|| / ||g_M|| without / with PG's direction "
              "(best non-negative scale per expert):", "",
              "| variant | " + " | ".join(tiers) + " |", "|---|" + "---:|" * len(tiers)]  # fmt: skip
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(
            f"{_cell(cell[(v, t)]['grad_bias'], 3)} / {_cell(cell[(v, t)]['grad_bias_pg'], 3)}" if (v, t) in cell else "-"
            for t in tiers) + " |")  # fmt: skip
    md_path = root / "ablation.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="UB-SMoE with one mechanism changed at a time (one seed).")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--budget", default="compare", help="experiment config naming the budget (configs/experiment)")
    parser.add_argument("--every", type=int, default=3, help="diagnostics.every: rounds between bias measurements")
    parser.add_argument("--root", type=Path, default=None, help="output directory (default logs/ablation/<time>)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or args.every < 1:
        print(f"Configuration error: --variants {unknown or args.variants} / --every {args.every}; "
              f"variants: {', '.join(VARIANTS)}, every >= 1", file=sys.stderr)  # fmt: skip
        return 2
    root = args.root or PROJECT_ROOT / "logs" / "ablation" / time.strftime("%Y-%m-%d_%H-%M-%S")
    root.mkdir(parents=True, exist_ok=True)
    common = [f"experiment={args.budget}", "method=ubsmoe", f"seed={args.seed}", "logger=csv",
              f"diagnostics.every={args.every}", *args.overrides]  # fmt: skip
    run_dirs = {}
    try:
        for variant in variants:
            run_dirs[variant] = root / variant
            train_once([*common, *VARIANTS[variant]], root / variant, tag="ablation")
    except TrainingFailed as err:
        print(f"[ablation] {err}", file=sys.stderr)
        return err.returncode
    title = f"UB-SMoE ablation (experiment={args.budget}, seed {args.seed}" + (
        f", {' '.join(args.overrides)})" if args.overrides else ")")
    csv_path, md_path = write_tables(rows_of(run_dirs), root, title=title)
    print(md_path.read_text())
    print(f"[ablation] {csv_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
