"""Figures from run directories, for the notebooks and for ``python -m ubsmoe.plots RUN_DIR...``.

Everything here reads only the two metrics files a run writes (``metrics.jsonl`` and
``experts.jsonl``, schema in :mod:`ubsmoe.callbacks.metrics_writer`) and, when present,
Hydra's ``.hydra/overrides.yaml`` beside them. Nothing talks to W&B's servers, so a sweep
can be plotted from disk, offline, long after it ran.

The figures are plain :class:`matplotlib.figure.Figure` objects built without pyplot: the
notebooks display them inline, the CLI saves them through the Agg renderer, and neither
leaks figures into pyplot's global registry. Dense methods (FedIT, HetLoRA, ...) have no
experts, so their utilization and phi plots are skipped rather than drawn empty.

Runs that share a *variant* (the method plus every Hydra override that differs between the
runs being compared, except the seed) are one line: the mean over their seeds, with a band
from the lowest to the highest seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
EXPERTS_FILE = "experts.jsonl"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
RUN_DIRS_ENV = "UBSMOE_RUN_DIRS"
PLOTS_SUBDIR = "plots"

# Overrides that never distinguish one variant from another: where a run writes, how it
# logs, and the seed (runs that differ only by seed are averaged into one line).
# The method group itself is not listed: a variant label starts with the method's name anyway.
_NOT_A_VARIANT = ("seed", "paths", "hydra", "logger", "fabric", "callbacks", "data.local_dir", "resume", "debug",
                  "dry_run")
# Short names for the override keys that most often label a variant.
_SHORT_KEYS = {"federation.dirichlet_alpha": "alpha", "federation.partition": "partition"}


class RunDirError(ValueError):
    """A run directory that cannot be plotted (missing or malformed metrics files); names the path."""


# ------------------------------------------------------------------------------------ loading
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: is {path.parent} a run directory (it should hold {path.name})?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RunDirError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
    return records


def load_metrics(run_dir: str | Path) -> pd.DataFrame:
    """One row per (round, tier) of ``RUN_DIR/metrics.jsonl``, sorted by round.

    The task metrics dict is also spread into columns ``val_<name>`` (e.g. ``val_accuracy``),
    and ``run`` holds the run directory. A resumed run that rewrote a round keeps its last record.
    """
    run_dir = Path(run_dir)
    records = _read_jsonl(run_dir / METRICS_FILE)
    if not records:
        raise RunDirError(f"{run_dir / METRICS_FILE} has no rounds yet: nothing to plot")
    frame = pd.DataFrame.from_records(records)
    missing = {"round", "tier", "method", "main_metric", "train_loss"} - set(frame.columns)
    if missing:
        raise RunDirError(
            f"{run_dir / METRICS_FILE} lacks the fields {sorted(missing)}: not a metrics file of this project"
        )
    frame = frame.drop_duplicates(subset=["round", "tier"], keep="last")
    frame = frame.sort_values("round", kind="stable").reset_index(drop=True)
    spread = pd.DataFrame.from_records([m or {} for m in frame["metrics"]], index=frame.index)
    for name in spread.columns:
        frame[f"val_{name}"] = spread[name].astype(float)
    frame["run"] = str(run_dir)
    return frame


def load_experts(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/experts.jsonl`` (one per round, sorted; a rewritten round keeps its last)."""
    by_round = {r["round"]: r for r in _read_jsonl(Path(run_dir) / EXPERTS_FILE)}
    return [by_round[k] for k in sorted(by_round)]


def run_overrides(run_dir: str | Path) -> dict[str, str]:
    """The command-line overrides Hydra saved for this run (``.hydra/overrides.yaml``), as key -> value."""
    path = Path(run_dir) / OVERRIDES_FILE
    if not path.is_file():
        return {}
    import yaml

    out: dict[str, str] = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _is_variant_key(key: str) -> bool:
    return key != "method" and not any(key == p or key.startswith(p + ".") for p in _NOT_A_VARIANT)


def _short_key(key: str) -> str:
    return _SHORT_KEYS.get(key, key.removeprefix("method."))


def load_runs(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """``load_metrics`` of every run, concatenated, with a ``variant`` column naming each line of a plot.

    The variant is the method plus the overrides whose values differ between these runs
    (seed and output settings excluded); each such override also becomes a column, so
    ``df[df["alpha"] == "0.1"]`` picks a slice before plotting.
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise RunDirError("no run directories given")
    frames = [load_metrics(d) for d in dirs]
    overrides = [run_overrides(d) for d in dirs]
    keys = sorted({k for o in overrides for k in o if _is_variant_key(k)})
    differing = [k for k in keys if len({o.get(k, "(default)") for o in overrides}) > 1]
    for frame, over in zip(frames, overrides, strict=True):
        parts = [str(frame["method"].iloc[0])]
        for key in differing:
            value = over.get(key, "(default)")
            frame[_short_key(key)] = value
            parts.append(f"{_short_key(key)}={value}")
        frame["variant"] = " ".join(parts)
    return pd.concat(frames, ignore_index=True)


def run_label(run_dir: str | Path, others: Sequence[str | Path] = ()) -> str:
    """A short unique name for a run directory: its path below the runs' common parent, '/' -> '_'."""
    run_dir = Path(run_dir).resolve()
    paths = [run_dir, *(Path(o).resolve() for o in others)]
    if len(paths) == 1:
        return run_dir.name
    parent = Path(os.path.commonpath(paths))
    rel = run_dir.relative_to(parent)
    label = "_".join(rel.parts) or run_dir.name
    if run_dir.name.isdigit():  # a multirun job directory: name it by its overrides, not "0", "1"
        overrides = run_overrides(run_dir)
        others_overrides = [run_overrides(o) for o in others]
        differing = [k for k in overrides if _is_variant_key(k) or k == "method"]
        differing = [k for k in differing if len({o.get(k) for o in [overrides, *others_overrides]}) > 1]
        if differing:
            label += "_" + "_".join(f"{_short_key(k)}={overrides[k]}" for k in differing)
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "-", label)


# ------------------------------------------------------------------------------------ run dirs for notebooks
def project_root() -> Path:
    """The project directory: $PROJECT_ROOT, else the first of cwd and its parents holding configs/train.yaml."""
    if os.environ.get("PROJECT_ROOT"):
        return Path(os.environ["PROJECT_ROOT"])
    for candidate in (Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents):
        if (candidate / "configs" / "train.yaml").is_file():
            return candidate
    return Path.cwd()


def newest_run_dir(runs_root: str | Path | None = None) -> Path:
    """The directory under ``logs/runs/`` whose metrics.jsonl was written last."""
    root = Path(runs_root) if runs_root is not None else project_root() / "logs" / "runs"
    candidates = list(root.rglob(METRICS_FILE)) if root.is_dir() else []
    if not candidates:
        raise RunDirError(
            f"no run directory with {METRICS_FILE} under {root}: run `make smoke`, or name run directories "
            f"in RUN_DIRS or ${RUN_DIRS_ENV} (colon-separated)"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime).parent


def resolve_run_dirs(run_dirs: Sequence[str | Path] = (), runs_root: str | Path | None = None) -> list[Path]:
    """The run directories a notebook plots: those given, else $UBSMOE_RUN_DIRS, else the newest run.

    Each is checked to hold a metrics.jsonl, so a typo fails here with the path in the message.
    """
    if run_dirs:
        dirs = [Path(d) for d in run_dirs]
    elif os.environ.get(RUN_DIRS_ENV):
        dirs = [Path(d) for d in os.environ[RUN_DIRS_ENV].split(os.pathsep) if d]
    else:
        dirs = [newest_run_dir(runs_root)]
    for d in dirs:
        if not (d / METRICS_FILE).is_file():
            raise RunDirError(f"{d} has no {METRICS_FILE}: not a run directory")
    return dirs


# ------------------------------------------------------------------------------------ tables
def tier_order(df: pd.DataFrame) -> list[str]:
    """Tier names from the weakest budget to the strongest."""
    tiers = df[["tier", "beta"]].drop_duplicates("tier") if "beta" in df else df[["tier"]].drop_duplicates()
    if "beta" in tiers:
        tiers = tiers.sort_values("beta", kind="stable")
    return [str(t) for t in tiers["tier"]]


def main_metric_name(df: pd.DataFrame) -> str | None:
    """Which task metric ``main_metric`` is (the metrics key equal to it on every evaluated row)."""
    evaluated = df[df["main_metric"].notna()]
    if evaluated.empty:
        return None
    for column in (c for c in df.columns if c.startswith("val_")):
        if np.allclose(evaluated[column].to_numpy(dtype=float), evaluated["main_metric"].to_numpy(dtype=float)):
            return column.removeprefix("val_")
    return None


def final_table(df: pd.DataFrame, metric: str = "main_metric") -> pd.DataFrame:
    """Variant x tier: ``metric`` at each run's last evaluated round, averaged over runs (seeds).

    The ``mean`` column is the mean over tiers, the number a sweep optimises.
    """
    df = _with_variant(df)
    evaluated = df[df[metric].notna()]
    if evaluated.empty:
        return pd.DataFrame()
    last_round = evaluated.groupby("run")["round"].transform("max")
    last = evaluated[evaluated["round"] == last_round]
    table = last.pivot_table(index="variant", columns="tier", values=metric, aggfunc="mean")
    table = table[[t for t in tier_order(df) if t in table.columns]]
    per_run = last.groupby(["variant", "run"])[metric].mean().groupby("variant").mean()
    table["mean"] = per_run
    table.columns.name = None
    return table


# ------------------------------------------------------------------------------------ figures
def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _new_figure(n_panels: int, xlabel: str, *, panel: tuple[float, float] = (3.6, 2.8), max_cols: int = 4,
                sharey: bool = True) -> tuple[Figure, list[Any]]:
    """A grid of panels sharing x; the x label and tick labels only under the lowest panel of each column."""
    rows, cols = _grid(n_panels, max_cols)
    fig = Figure(figsize=(panel[0] * cols, panel[1] * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=sharey).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    if xlabel == "round":
        from matplotlib.ticker import MaxNLocator

        for ax in axes[:n_panels]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    for i, ax in enumerate(axes[:n_panels]):
        if i + cols >= n_panels:
            ax.set_xlabel(xlabel)
            ax.xaxis.set_tick_params(labelbottom=True)
    return fig, axes[:n_panels]


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _per_tier_lines(df: pd.DataFrame, value: str, ylabel: str, title: str) -> Figure | None:
    """One panel per tier, one line per variant: mean over runs, band from min to max."""
    df = _with_variant(df)
    data = df[df[value].notna()]
    if data.empty:
        return None
    tiers = [t for t in tier_order(df) if t in set(data["tier"])]
    variants = list(dict.fromkeys(df["variant"]))
    fig, axes = _new_figure(len(tiers), "round")
    for ax, tier in zip(axes, tiers, strict=True):
        rows = data[data["tier"] == tier]
        for variant, color in zip(variants, _colors(len(variants)), strict=True):
            curve = rows[rows["variant"] == variant].groupby("round")[value].agg(["mean", "min", "max", "count"])
            if curve.empty:
                continue
            seeds = rows.loc[rows["variant"] == variant, "run"].nunique() if "run" in rows else 1
            ax.plot(curve.index, curve["mean"], marker="o", markersize=3, color=color, label=variant)
            if (curve["count"] > 1).any():
                ax.fill_between(curve.index, curve["min"], curve["max"], color=color, alpha=0.2, linewidth=0,
                                label=f"{variant}: min-max over {seeds} runs (seeds)")
        beta = df.loc[df["tier"] == tier, "beta"].iloc[0] if "beta" in df else None
        ax.set_title(f"{tier} (beta={beta:g})" if beta is not None else str(tier))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize="small")
    fig.suptitle(title)
    return fig


def _with_variant(df: pd.DataFrame) -> pd.DataFrame:
    return df if "variant" in df else df.assign(variant=df["method"])


def convergence_figure(df: pd.DataFrame, metric: str = "main_metric") -> Figure | None:
    """The task metric against rounds: one panel per tier, one line per (variant, tier). None if never evaluated."""
    df = _with_variant(df)
    name = main_metric_name(df) if metric == "main_metric" else metric.removeprefix("val_")
    task = ", ".join(sorted({str(t) for t in df.get("task", pd.Series(dtype=str)).dropna()}))
    return _per_tier_lines(df, metric, f"validation {name or 'main metric'}", f"{task} convergence per tier".strip())


def train_loss_figure(df: pd.DataFrame) -> Figure | None:
    """Mean local training loss of each tier's sampled clients against rounds. None without any."""
    df = _with_variant(df)
    return _per_tier_lines(df, "train_loss", "train loss", "local training loss per tier")


def balance_figure(df: pd.DataFrame) -> Figure | None:
    """Expert balance against rounds: normalised routing entropy (mean over layers; 1 = balanced).

    None for dense methods, which have no experts.
    """
    df = _with_variant(df)

    def mean_entropy(values: Any) -> float:
        if not isinstance(values, list) or not values:
            return float("nan")
        return float(np.mean(values))

    if "expert_entropy" not in df:
        return None
    df = df.assign(mean_expert_entropy=df["expert_entropy"].map(mean_entropy))
    return _per_tier_lines(df, "mean_expert_entropy", "routing entropy (1 = balanced)",
                           "evaluation expert balance per tier")


def grad_bias_figure(df: pd.DataFrame) -> Figure | None:
    """The relative bias of the sparse expert gradient per tier against rounds, PG off and on.

    ``grad_bias`` / ``grad_bias_pg`` (``diagnostics.every``; callbacks/grad_bias.py):
    ``||g_K - g_M|| / ||g_M||`` of the expert-LoRA gradient on a fixed probe batch. Each
    variant is two lines, ``(PG off)`` and ``(PG on)``. None when no run measured it.
    """
    if "grad_bias" not in df or df["grad_bias"].isna().all():
        return None
    df = _with_variant(df)
    parts = []
    for column, label in (("grad_bias", "PG off"), ("grad_bias_pg", "PG on")):
        if column in df:
            part = df.assign(bias=df[column].astype(float), variant=df["variant"] + f" ({label})")
            parts.append(part)
    return _per_tier_lines(pd.concat(parts, ignore_index=True), "bias", "||g_K - g_M|| / ||g_M||",
                           "expert-gradient bias against all experts, per tier")


def layer_label(name: str) -> str:
    """'backbone.encoder.layer.3' -> 'layer 3' (the last number in a layer's name), else the name."""
    numbers = re.findall(r"\d+", name)
    return f"layer {numbers[-1]}" if numbers else name


def _series(records: Sequence[dict[str, Any]], pick: Any) -> tuple[list[int], dict[str, np.ndarray]]:
    """Rounds and layer -> [rounds, experts] for the per-layer vectors ``pick(record)`` returns."""
    rounds: list[int] = []
    stacks: dict[str, list[list[float]]] = {}
    for record in records:
        per_layer = pick(record)
        if not per_layer:
            continue
        rounds.append(int(record["round"]))
        for layer, values in per_layer.items():
            stacks.setdefault(layer, []).append(values)
    return rounds, {layer: np.asarray(v, dtype=float) for layer, v in stacks.items()}


def _layer_lines(rounds: list[int], series: dict[str, np.ndarray], ylabel: str, title: str,
                 reference: Any = None, reference_label: str = "") -> Figure:
    fig, axes = _new_figure(len(series), "round", panel=(3.2, 2.5), max_cols=3)
    num_experts = next(iter(series.values())).shape[1]
    colors = _colors(num_experts)
    for ax, (layer, values) in zip(axes, series.items(), strict=True):
        for expert in range(values.shape[1]):
            ax.plot(rounds, values[:, expert], marker="o", markersize=2, color=colors[expert], label=f"expert {expert}")
        if reference is not None:
            ref = reference(values)
            ax.plot(rounds, ref, color="black", linestyle="--", linewidth=1, label=reference_label)
        ax.set_title(layer_label(layer))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small")
    fig.suptitle(title)
    return fig


def utilization_sources(records: Sequence[dict[str, Any]]) -> list[str]:
    """What utilization the records hold: 'train' (aggregated over clients) and each evaluated tier."""
    sources = ["train"] if any(r.get("train_utilization") for r in records) else []
    for record in records:
        for tier, per_layer in (record.get("eval_utilization") or {}).items():
            if per_layer and tier not in sources:
                sources.append(tier)
    return sources


def utilization_figure(records: Sequence[dict[str, Any]], source: str = "train") -> Figure | None:
    """Each expert's share of tokens against rounds, one panel per layer, for the clients' training
    (``source="train"``) or one tier's evaluation (``source=TIER``). None when there are no experts.

    The dashed line is the balanced share: the mean over experts (K_bar / M or K_c / M).
    """
    if source == "train":
        rounds, series = _series(records, lambda r: r.get("train_utilization"))
        title = "expert utilization in training (all sampled clients)"
    else:
        rounds, series = _series(records, lambda r: (r.get("eval_utilization") or {}).get(source))
        title = f"expert utilization in evaluation, tier {source}"
    if not series:
        return None
    return _layer_lines(rounds, series, "share of tokens", title, reference=lambda v: v.mean(axis=1),
                        reference_label="balanced")


def phi_figure(records: Sequence[dict[str, Any]]) -> Figure | None:
    """The DMR modulation phi of each expert against rounds, one panel per layer. None without phi."""
    rounds, series = _series(records, lambda r: r.get("phi"))
    if not series:
        return None
    return _layer_lines(rounds, series, "phi", "DMR modulation phi (> 0 lifts neglected experts)",
                        reference=lambda v: np.zeros(v.shape[0]), reference_label="no modulation")


def heatmap_figure(records: Sequence[dict[str, Any]]) -> Figure | None:
    """Layer x expert evaluation utilization of the last evaluated round, one panel per tier (shared scale)."""
    last = next((r for r in reversed(records) if any((r.get("eval_utilization") or {}).values())), None)
    if last is None:
        return None
    tiers = {t: u for t, u in last["eval_utilization"].items() if u}
    matrices = {t: np.asarray(list(u.values()), dtype=float) for t, u in tiers.items()}
    layers = [layer_label(name) for name in next(iter(tiers.values()))]
    vmax = max(1.0, max(float(m.max()) for m in matrices.values()))
    fig, axes = _new_figure(len(tiers), "expert", panel=(3.0, 0.35 * len(layers) + 1.2), max_cols=4, sharey=True)
    image = None
    for ax, (tier, matrix) in zip(axes, matrices.items(), strict=True):
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(f"{tier} (balanced {matrix.mean():.2f})")
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(len(layers)), layers)
    fig.colorbar(image, ax=axes, label="share of tokens routed to the expert")
    fig.suptitle(f"evaluation utilization, round {last['round']}")
    return fig


# ------------------------------------------------------------------------------------ writing PNGs
def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG (Agg renderer), creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def comparison_figures(df: pd.DataFrame) -> dict[str, Figure | None]:
    """The figures that compare runs: convergence, training loss, expert balance (file stem -> figure)."""
    return {"convergence": convergence_figure(df), "train_loss": train_loss_figure(df), "balance": balance_figure(df),
            "grad_bias": grad_bias_figure(df)}


def expert_figures(records: Sequence[dict[str, Any]]) -> dict[str, Figure | None]:
    """One run's expert figures (file stem -> figure; None where the run has nothing to show)."""
    figures: dict[str, Figure | None] = {}
    sources = utilization_sources(records)
    if not sources:
        figures["utilization"] = None
    for source in sources:
        figures[f"utilization_{source}"] = utilization_figure(records, source)
    figures["phi"] = phi_figure(records)
    figures["heatmap"] = heatmap_figure(records)
    return figures


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
    import matplotlib

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


if __name__ == "__main__":
    sys.exit(main())
