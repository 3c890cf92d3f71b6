"""``make results``: every method over several seeds on a named budget, with the noise made visible.

Runs ``python src/train.py experiment=BUDGET method=M seed=S`` for every method and seed (a
fresh process each) into ``ROOT/runs/M/seedS`` (and, with ``--centralized``, the centralized
bound of every tier), then writes into ``ROOT`` (default ``logs/results/<time>``):

- ``results.csv``: one row per (method, seed, tier): main metric, FLOPs per example and
  their ratio to the dense model, at the last evaluated round, and the bytes sent per client
  and round each way over the whole run (:func:`traffic_per_client`);
- ``results.md``: per tier, each method's mean and standard deviation over seeds, and the
  paired difference of UB-SMoE against each other method on the same seeds with a
  bootstrap confidence interval (seeds resampled with replacement), marked when the
  interval contains 0 (the difference is inside the seed noise); before the per-tier
  sections, one accuracy table and one cost table (FLOPs, bytes down and up) over all tiers;
- ``accuracy_vs_flops.png``: every method at every tier a point (mean over seeds, error bar
  one standard deviation) at its FLOPs per example relative to the dense model.

Usage: python -m ubsmoe.results [--seeds 42,43,44] [--methods a,b] [--budget compare]
       [--centralized] [--root DIR] [HYDRA_OVERRIDE ...]
       python -m ubsmoe.results --analyze-only --root DIR   (tables and figures from finished runs)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ubsmoe.compare import (
    CENTRALIZED_DENSE,
    FINISHED,
    TrainingFailed,
    last_evaluated,
    last_evaluation,
    run_centralized,
    run_records,
    train,
    train_once,
    write_csv,
)
from ubsmoe.names import METHODS
from ubsmoe.plots.figures import distinct_colors

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REFERENCE = "ubsmoe"


def bootstrap_ci(differences: np.ndarray, *, level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences (seeds resampled with replacement)."""
    rng = np.random.default_rng(seed)
    d = np.asarray(differences, dtype=np.float64)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def traffic_per_client(records: list[dict]) -> dict[str, tuple[float, float]]:
    """Per tier, the bytes (down, up) of one client in one round, over every round of the run.

    Down is everything the server sent to the tier (``bytes_sent``: the payloads and, for
    FLoRA and FLoRIST, the broadcast that every client of the tier receives, sampled or
    not), up everything its clients sent back; both are divided by the tier's trained
    client-rounds. A run whose tier trained no client (a centralized bound) has 0 both ways.
    """
    sums: dict[str, list[float]] = {}
    for r in records:
        acc = sums.setdefault(r["tier"], [0.0, 0.0, 0.0])
        acc[0] += r["bytes_sent"]
        acc[1] += r["bytes_received"]
        acc[2] += r["num_clients"]
    return {tier: (down / max(n, 1.0), up / max(n, 1.0)) for tier, (down, up, n) in sums.items()}


def collect(run_dirs: dict[tuple[str, int], Path]) -> list[dict]:
    """One row per (method, seed, tier) from each run's last evaluated round, with its traffic."""
    rows = []
    for (method, seed), run_dir in sorted(run_dirs.items()):
        records = run_records(run_dir)  # read once: the traffic needs every round, the metrics the last
        traffic = traffic_per_client(records)
        for record in last_evaluated(records):
            down, up = traffic[record["tier"]]
            rows.append({
                "method": method, "seed": seed, "tier": record["tier"], "beta": record["beta"], "k": record["k"],
                "rank": record["rank"], "round": record["round"], "main_metric": record["main_metric"],
                "flops_per_example": record["flops_per_example"],
                "flops_ratio_to_dense": record["flops_ratio_to_dense"],
                "bytes_down_per_client_round": round(down), "bytes_up_per_client_round": round(up),
            })  # fmt: skip
    return rows


def summarize(rows: list[dict], *, reference: str = REFERENCE, level: float = 0.95) -> dict:
    """Per tier: each method's mean/std over seeds, and the paired differences of ``reference`` with their CI."""
    tiers = list(dict.fromkeys(r["tier"] for r in rows if r["method"] not in (CENTRALIZED_DENSE,)))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out: dict = {}
    for tier in tiers:
        by_method: dict[str, dict[int, dict]] = {}
        for r in rows:
            if r["tier"] == tier or (r["method"] == CENTRALIZED_DENSE):
                by_method.setdefault(r["method"], {})[r["seed"]] = r
        stats = {}
        for method in methods:
            values = by_method.get(method)
            if not values:
                continue
            acc = np.array([v["main_metric"] for v in values.values()])
            flops = np.array([v["flops_per_example"] for v in values.values()])
            stats[method] = {
                "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if acc.size > 1 else 0.0, "n": int(acc.size),
                "flops_per_example": float(flops.mean()),
                "flops_ratio_to_dense": float(np.mean([v["flops_ratio_to_dense"] for v in values.values()])),
                "bytes_down": float(np.mean([v["bytes_down_per_client_round"] for v in values.values()])),
                "bytes_up": float(np.mean([v["bytes_up_per_client_round"] for v in values.values()])),
            }  # fmt: skip
        diffs = {}
        ref = by_method.get(reference, {})
        for method in methods:
            if method == reference or method not in by_method:
                continue
            seeds = sorted(set(ref) & set(by_method[method]))
            if not seeds:
                continue
            d = np.array([ref[s]["main_metric"] - by_method[method][s]["main_metric"] for s in seeds])
            low, high = bootstrap_ci(d, level=level)
            diffs[method] = {"mean": float(d.mean()), "low": low, "high": high, "n": len(seeds),
                             # one seed gives no interval: nothing can be told apart from the noise
                             "inside_noise": len(seeds) < 2 or bool(low <= 0.0 <= high)}  # fmt: skip
        out[tier] = {"stats": stats, "differences": diffs}
    return out


def tier_table(summary: dict, cell: Callable[[dict, dict | None], str]) -> list[str]:
    """A table with a row per method and a column per tier; ``cell(stats, difference)`` writes one
    cell from the method's stats at the tier and its paired difference (``None`` without one)."""
    tiers = list(summary)
    methods = list(dict.fromkeys(m for block in summary.values() for m in block["stats"]))
    lines = ["| method | " + " | ".join(tiers) + " |", "|---|" + "---:|" * len(tiers)]
    for method in methods:
        cells = []
        for tier in tiers:
            stat = summary[tier]["stats"].get(method)
            cells.append("-" if stat is None else cell(stat, summary[tier]["differences"].get(method)))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def overview_lines(summary: dict) -> list[str]:
    """Per tier the mean +- std over seeds; a mark where the paired interval of the reference
    against that method excludes 0 (``+``: reference better, ``-``: worse)."""

    def cell(stat: dict, diff: dict | None) -> str:
        mark = "" if diff is None or diff["inside_noise"] else (" (+)" if diff["mean"] > 0 else " (-)")
        spread = f" ± {stat['std']:.4f}" if stat["n"] > 1 else ""  # one seed has no spread
        return f"{stat['mean']:.4f}{spread}{mark}"

    return tier_table(summary, cell)


def cost_lines(summary: dict) -> list[str]:
    """Per tier the FLOPs per example relative to the dense model and the megabytes (10^6 bytes)
    one client receives / sends in a round, means over seeds."""
    return tier_table(summary, lambda s, _: f"{s['flops_ratio_to_dense']:.2f} · {s['bytes_down'] / 1e6:.2f} / "
                      f"{s['bytes_up'] / 1e6:.2f}")  # fmt: skip


def write_markdown(summary: dict, path: Path, *, title: str, reference: str = REFERENCE, level: float = 0.95) -> Path:
    pct = round(level * 100)
    lines = [f"# {title}", "", f"Mean ± standard deviation over seeds; (+) / (-): {reference} is better / worse "
             f"than that method with the {pct}% paired bootstrap interval excluding 0.", "",
             *overview_lines(summary), "",
             "Cost per tier: forward FLOPs per example relative to the dense model · megabytes one client "
             "receives / sends in a round (means over seeds and rounds).", "", *cost_lines(summary), ""]  # fmt: skip
    for tier, block in summary.items():
        lines += [f"## tier {tier}", "", "| method | mean | std | seeds | FLOPs / example (G) | FLOPs vs dense "
                  "| down / client-round (MB) | up / client-round (MB) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for method, s in block["stats"].items():
            std = f"{s['std']:.4f}" if s["n"] > 1 else "-"
            lines.append(f"| {method} | {s['mean']:.4f} | {std} | {s['n']} | "
                         f"{s['flops_per_example'] / 1e9:.3f} | {s['flops_ratio_to_dense']:.3f} | "
                         f"{s['bytes_down'] / 1e6:.3f} | {s['bytes_up'] / 1e6:.3f} |")  # fmt: skip
        if block["differences"]:
            lines += ["", f"{reference} minus each method, paired on seeds, with a {pct}% bootstrap interval:", "",
                      "| against | difference | interval | seeds | inside the noise |", "|---|---:|---|---:|---|"]  # fmt: skip
            for method, d in block["differences"].items():
                lines.append(f"| {method} | {d['mean']:+.4f} | [{d['low']:+.4f}, {d['high']:+.4f}] | {d['n']} | "
                             f"{'yes' if d['inside_noise'] else 'no'} |")  # fmt: skip
        lines.append("")
    lines.append("A bootstrap over a handful of seeds is coarse: with 3 seeds the interval can only take a few "
                 "distinct values; read 'no' as 'all seeds agree on the sign', not as significance. One seed "
                 "gives no interval, and no mark.")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


TIER_MARKERS = ("v", "s", "D", "o", "^", "P", "X", "*")


def accuracy_vs_flops_figure(summary: dict) -> Figure:
    """Every method (a colour) at every tier (a marker): FLOPs per example relative to the dense
    model against the mean main metric, error bar one standard deviation over seeds."""
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.subplots()
    methods = list(dict.fromkeys(m for block in summary.values() for m in block["stats"]))
    colors = dict(zip(methods, distinct_colors(len(methods)), strict=True))
    for (tier, block), marker in zip(summary.items(), TIER_MARKERS * len(summary)):
        for method, s in block["stats"].items():
            ax.errorbar(s["flops_ratio_to_dense"], s["mean"], yerr=s["std"], fmt=marker, capsize=3,
                        color=colors[method], alpha=0.85)  # fmt: skip
        ax.plot([], [], marker, color="0.3", linestyle="none", label=f"tier {tier}")
    for method, color in colors.items():
        ax.plot([], [], "o", color=color, linestyle="none", label=method)
    ax.set_xlabel("forward FLOPs per example relative to the dense model")
    ax.set_ylabel("validation main metric (mean over seeds, +- std)")
    ax.set_title("accuracy against compute, every method and tier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncols=2)
    return fig


def analyze(run_dirs: dict[tuple[str, int], Path], root: Path, *, title: str) -> dict[str, Path]:
    """results.csv, results.md and accuracy_vs_flops.png into ``root``."""
    rows = collect(run_dirs)
    summary = summarize(rows)
    written = {"csv": write_csv(rows, root / "results.csv"), "md": write_markdown(summary, root / "results.md", title=title)}
    written["png"] = root / "accuracy_vs_flops.png"
    accuracy_vs_flops_figure(summary).savefig(written["png"], format="png", dpi=100)
    return written


def find_runs(root: Path) -> dict[tuple[str, int], Path]:
    """The finished runs under ``root/runs/<method>/seed<S>`` (and centralized ones, merged per seed).

    A run counts once its ``run.done`` marker is written; one still training, or killed, is
    left out of the tables, and named, so that a half-finished run never enters a mean.
    """
    found = {}
    for run_dir in sorted(p for p in (root / "runs").glob("*/seed*") if p.is_dir()):
        if (run_dir / FINISHED).is_file():
            found[(run_dir.parent.name, int(run_dir.name.removeprefix("seed")))] = run_dir
        else:
            print(f"[results] {run_dir} has not finished: left out", flush=True)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Every method over seeds; per-tier tables with bootstrap CIs.")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budget", default="compare", help="experiment config naming the budget (configs/experiment)")
    parser.add_argument("--centralized", action="store_true", help="also run each tier's centralized bound per seed")
    parser.add_argument("--root", type=Path, default=None, help="output directory (default logs/results/<time>)")
    parser.add_argument("--analyze-only", action="store_true", help="only tabulate the runs already under --root")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not seeds:
        print(f"Configuration error: --methods {unknown} / --seeds {args.seeds}; methods: {', '.join(METHODS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    root = args.root or PROJECT_ROOT / "logs" / "results" / time.strftime("%Y-%m-%d_%H-%M-%S")
    root.mkdir(parents=True, exist_ok=True)
    common = [f"experiment={args.budget}", "logger=csv", *args.overrides]
    try:
        for seed in [] if args.analyze_only else seeds:
            for method in methods:
                run_dir = root / "runs" / method / f"seed{seed}"
                train_once([*common, f"method={method}", f"seed={seed}"], run_dir, tag="results")
            if args.centralized:
                tiers = [r["tier"] for r in last_evaluation(root / "runs" / methods[0] / f"seed{seed}")]
                bounds = run_centralized(root / "centralized" / f"seed{seed}", tiers, [*common, f"seed={seed}"], train)
                for name, run_dir in bounds.items():
                    target = root / "runs" / name / f"seed{seed}"
                    target.mkdir(parents=True, exist_ok=True)
                    (target / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
                    (target / FINISHED).write_text("")
    except TrainingFailed as err:
        print(f"[results] {err}", file=sys.stderr)
        return err.returncode
    run_dirs = find_runs(root)
    if not run_dirs:
        print(f"[results] no finished run under {root / 'runs'}: nothing to tabulate", file=sys.stderr)
        return 1
    found_seeds = ",".join(str(s) for s in sorted({seed for _, seed in run_dirs}))
    written = analyze(run_dirs, root, title=f"Results over seeds {found_seeds} (experiment={args.budget}"
                      + (f", {' '.join(args.overrides)}" if args.overrides else "") + ")")  # fmt: skip
    print(written["md"].read_text())
    print(f"[results] {', '.join(str(p) for p in written.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
