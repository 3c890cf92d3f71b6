"""The figures of run directories, as plain :class:`matplotlib.figure.Figure` objects.

They are built without pyplot: the notebooks display them inline, the CLI
(:mod:`ubsmoe.plots.cli`) saves them through the Agg renderer, and neither leaks figures
into pyplot's global registry. Dense methods (FedIT, HetLoRA, ...) have no experts, so
their utilization and phi plots are skipped rather than drawn empty. Each line is a variant
(:func:`ubsmoe.plots.runs.load_runs`): the mean over its seeds, with a min-max band.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ubsmoe.plots.runs import main_metric_name, tier_order, with_variant


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
        from matplotlib.ticker import MaxNLocator  # matplotlib: heavy optional dependency, loaded where used

        for ax in axes[:n_panels]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    for i, ax in enumerate(axes[:n_panels]):
        if i + cols >= n_panels:
            ax.set_xlabel(xlabel)
            ax.xaxis.set_tick_params(labelbottom=True)
    return fig, axes[:n_panels]


def distinct_colors(n: int) -> list[Any]:
    """``n`` colours told apart at a glance, one per line (tab10, or tab20 beyond ten)."""
    from matplotlib import colormaps  # matplotlib: heavy optional dependency, imported where used

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _per_tier_lines(df: pd.DataFrame, value: str, ylabel: str, title: str) -> Figure | None:
    """One panel per tier, one line per variant: mean over runs, band from min to max."""
    df = with_variant(df)
    data = df[df[value].notna()]
    if data.empty:
        return None
    tiers = [t for t in tier_order(df) if t in set(data["tier"])]
    variants = list(dict.fromkeys(df["variant"]))
    fig, axes = _new_figure(len(tiers), "round")
    for ax, tier in zip(axes, tiers, strict=True):
        rows = data[data["tier"] == tier]
        for variant, color in zip(variants, distinct_colors(len(variants)), strict=True):
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


def convergence_figure(df: pd.DataFrame, metric: str = "main_metric") -> Figure | None:
    """The task metric against rounds: one panel per tier, one line per (variant, tier). None if never evaluated."""
    df = with_variant(df)
    name = main_metric_name(df) if metric == "main_metric" else metric.removeprefix("val_")
    task = ", ".join(sorted({str(t) for t in df.get("task", pd.Series(dtype=str)).dropna()}))
    return _per_tier_lines(df, metric, f"validation {name or 'main metric'}", f"{task} convergence per tier".strip())


def train_loss_figure(df: pd.DataFrame) -> Figure | None:
    """Mean local training loss of each tier's sampled clients against rounds. None without any."""
    df = with_variant(df)
    return _per_tier_lines(df, "train_loss", "train loss", "local training loss per tier")


def balance_figure(df: pd.DataFrame) -> Figure | None:
    """Expert balance against rounds: normalised routing entropy (mean over layers; 1 = balanced).

    None for dense methods, which have no experts.
    """
    df = with_variant(df)

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
    df = with_variant(df)
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
    colors = distinct_colors(num_experts)
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
