"""``python -m ubsmoe.plots RUN_DIR...``: every figure of some run directories as PNGs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from matplotlib.figure import Figure

from ubsmoe.plots.figures import comparison_figures, expert_figures, save_figure
from ubsmoe.plots.runs import EXPERTS_FILE, METRICS_FILE, RunDirError, load_experts, load_runs, run_label

PLOTS_SUBDIR = "plots"  # where a run's PNGs go by default: RUN_DIR/plots/

_SKIP_REASONS = {
    "convergence": "no evaluated round yet",
    "train_loss": "no training loss recorded",
    "balance": "no expert telemetry (dense method)",
    "grad_bias": "no gradient-bias measurement (diagnostics.every unset, or dense methods)",
    "utilization": "no expert telemetry (dense method)",
    "phi": "no phi (dense method or DMR disabled)",
    "heatmap": "no evaluation utilization (dense method or no evaluated round)",
}


def _write(figures: dict[str, Figure | None], out_dir: Path, owner: str, err: TextIO) -> list[Path]:
    written = []
    for stem, fig in figures.items():
        if fig is None:
            reason = _SKIP_REASONS.get(stem) or _SKIP_REASONS.get(stem.split("_")[0], "nothing to plot")
            print(f"{owner}: skipped {stem}.png: {reason}", file=err)
            continue
        written.append(save_figure(fig, out_dir / f"{stem}.png"))
    return written


def write_plots(
    run_dirs: Sequence[str | Path], out: str | Path | None = None, err: TextIO | None = None
) -> list[Path]:
    """Every figure as a PNG; returns the paths written.

    Per run: ``convergence``, ``train_loss``, ``balance`` and the expert figures, into
    ``RUN_DIR/plots/`` (or ``OUT`` for one run, ``OUT/<run label>/`` for several). With several
    runs the comparison figures go to ``OUT`` (default: ``plots/`` in the runs' common parent,
    e.g. a multirun's sweep directory). All runs are loaded (and checked) before anything is written;
    what is skipped (dense methods have no expert figures) is said on ``err`` (default stderr).
    """
    err = err if err is not None else sys.stderr
    dirs = [Path(d) for d in run_dirs]
    df = load_runs(dirs)
    experts = {}
    for d in dirs:
        if (d / EXPERTS_FILE).is_file():
            experts[d] = load_experts(d)
        else:
            print(f"{d}: no {EXPERTS_FILE}; skipped the expert figures", file=err)
    written: list[Path] = []
    for d in dirs:
        if out is None:
            target = d / PLOTS_SUBDIR
        elif len(dirs) == 1:
            target = Path(out)
        else:
            target = Path(out) / run_label(d, dirs)
        own = df[df["run"] == str(d)]
        figures = comparison_figures(own)
        if d in experts:
            figures.update(expert_figures(experts[d]))
        written += _write(figures, target, str(d), err)
    if len(dirs) > 1:
        if out is not None:
            target = Path(out)
        else:
            parent = Path(os.path.commonpath([d.resolve() for d in dirs]))
            target = parent / PLOTS_SUBDIR
        written += _write(comparison_figures(df), target, f"comparison of {len(dirs)} runs", err)
    return written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ubsmoe.plots",
        description="Write convergence, training-loss, expert-utilization, phi and heatmap PNGs "
        "from run directories (their metrics.jsonl and experts.jsonl).",
    )
    parser.add_argument(
        "run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run directory (holds metrics.jsonl)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, metavar="DIR",
        help="write here instead of each RUN_DIR/plots/ (several runs: comparison figures here, "
        "each run's own figures in DIR/<run label>/)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; exit code 2 when a run directory cannot be read (the message names the path)."""
    import matplotlib  # matplotlib: heavy optional dependency, configured only when the CLI runs

    matplotlib.use("Agg")
    args = _parser().parse_args(argv)
    # A glob over logs/runs also matches failed and dry runs, which never wrote metrics: skip them.
    usable = []
    for d in args.run_dirs:
        path = d / METRICS_FILE
        if not path.is_file() or not path.read_text().strip():
            print(f"warning: skipping {d}: {path} is missing or has no rounds (a failed or dry run?)", file=sys.stderr)
            continue
        usable.append(d)
    if not usable:
        print(f"error: none of the {len(args.run_dirs)} directories holds a {METRICS_FILE} with rounds", file=sys.stderr)
        return 2
    try:
        written = write_plots(usable, args.out)
    except RunDirError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
