"""Figures from run directories, for the notebooks and for ``python -m ubsmoe.plots RUN_DIR...``.

- :mod:`ubsmoe.plots.runs`: reading run directories (``metrics.jsonl``, ``experts.jsonl``,
  Hydra's overrides), variants and tables; no matplotlib;
- :mod:`ubsmoe.plots.figures`: the figures, plain :class:`matplotlib.figure.Figure` objects;
- :mod:`ubsmoe.plots.cli`: the PNGs of ``python -m ubsmoe.plots``.

The names below are the package's public surface (``from ubsmoe import plots``; ``plots.load_runs(...)``).
"""

from ubsmoe.plots.cli import PLOTS_SUBDIR, main, write_plots
from ubsmoe.plots.figures import (
    balance_figure,
    comparison_figures,
    convergence_figure,
    distinct_colors,
    expert_figures,
    grad_bias_figure,
    heatmap_figure,
    layer_label,
    phi_figure,
    save_figure,
    train_loss_figure,
    utilization_figure,
    utilization_sources,
)
from ubsmoe.plots.runs import (
    EXPERTS_FILE,
    METRICS_FILE,
    OVERRIDES_FILE,
    RUN_DIRS_ENV,
    RunDirError,
    final_table,
    load_experts,
    load_metrics,
    load_runs,
    main_metric_name,
    newest_run_dir,
    project_root,
    resolve_run_dirs,
    run_label,
    run_overrides,
    tier_order,
    with_variant,
)

__all__ = (
    "EXPERTS_FILE",
    "METRICS_FILE",
    "OVERRIDES_FILE",
    "PLOTS_SUBDIR",
    "RUN_DIRS_ENV",
    "RunDirError",
    "balance_figure",
    "comparison_figures",
    "convergence_figure",
    "distinct_colors",
    "expert_figures",
    "final_table",
    "grad_bias_figure",
    "heatmap_figure",
    "layer_label",
    "load_experts",
    "load_metrics",
    "load_runs",
    "main",
    "main_metric_name",
    "newest_run_dir",
    "phi_figure",
    "project_root",
    "resolve_run_dirs",
    "run_label",
    "run_overrides",
    "save_figure",
    "tier_order",
    "train_loss_figure",
    "utilization_figure",
    "utilization_sources",
    "with_variant",
    "write_plots",
)
