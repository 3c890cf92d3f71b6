"""A quick look at a partition: a per-client table on the console and a stacked bar chart.

Label skew is the experimental variable of a federated run, so every run shows how skewed
its clients really are (the Dirichlet draw with a small alpha can be far from what one
imagines). The chart is drawn with matplotlib's Agg canvas directly, without pyplot, so it
never touches a global backend or leaves figures open.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

PNG_NAME = "partition.png"


def label_entropy(label_counts: np.ndarray) -> np.ndarray:
    """Entropy in bits of each row's label distribution (0 = one label only; an empty row gives 0)."""
    counts = np.asarray(label_counts, dtype=np.float64)
    totals = counts.sum(axis=-1, keepdims=True)
    probs = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    logs = np.log2(probs, out=np.zeros_like(probs), where=probs > 0)
    return -(probs * logs).sum(axis=-1) + 0.0  # + 0.0 turns -0.0 (one label) into 0.0


def partition_report(
    label_counts: np.ndarray,
    label_names: Sequence[str],
    out_dir: str | Path | None,
    console: Any = None,
) -> Path | None:
    """Print the per-client table and write ``partition.png`` into ``out_dir`` (if given).

    ``label_counts`` is [num_clients, num_labels]. Returns the PNG path, or None without
    ``out_dir``.
    """
    counts = np.asarray(label_counts, dtype=np.int64)
    if counts.ndim != 2 or counts.shape[1] != len(label_names):
        raise ValueError(f"label_counts has shape {counts.shape}; expected [num_clients, {len(label_names)}]")
    sizes = counts.sum(axis=1)
    entropy = label_entropy(counts)

    table = Table(title=f"Partition: {counts.shape[0]} clients, {int(sizes.sum())} examples")
    table.add_column("client", justify="right")
    table.add_column("size", justify="right")
    for name in label_names:
        table.add_column(str(name), justify="right")
    table.add_column("entropy (bits)", justify="right")
    for client, row in enumerate(counts):
        table.add_row(str(client), str(int(sizes[client])), *map(str, row.tolist()), f"{entropy[client]:.3f}")
    (console or Console()).print(table)

    if out_dir is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PNG_NAME
    _draw_stacked_bars(counts, label_names, entropy).savefig(path, dpi=100)
    return path


def _draw_stacked_bars(counts: np.ndarray, label_names: Sequence[str], entropy: np.ndarray) -> Figure:
    num_clients = counts.shape[0]
    figure = Figure(figsize=(max(4.0, 0.35 * num_clients + 2.0), 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    clients = np.arange(num_clients)
    bottom = np.zeros(num_clients)
    for label, name in enumerate(label_names):
        axes.bar(clients, counts[:, label], bottom=bottom, label=str(name), width=0.8)
        bottom += counts[:, label]
    axes.set_xlabel("client")
    axes.set_ylabel("examples")
    axes.set_title(f"Examples per client and label (mean entropy {entropy.mean():.2f} bits)")
    if num_clients <= 40:
        axes.set_xticks(clients)
    figure.legend(title="label", fontsize="small", loc="outside right upper")
    return figure
