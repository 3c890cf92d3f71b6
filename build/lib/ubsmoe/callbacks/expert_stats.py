"""Expert-utilization histograms, a layer-by-expert heatmap and phi, to W&B every round.

Reads only the round summary (aggregated training utilization, per-tier evaluation
utilization, global phi); logs through the W&B run of any Lightning ``WandbLogger`` that
Fabric holds, and does nothing when no W&B logger is configured (the metrics files keep
the same numbers for the notebooks).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ubsmoe.fl.summary import RoundSummary


def utilization_matrix(per_layer: dict[str, Any]) -> np.ndarray:
    """[layers, experts] from a layer -> [M] mapping (layer order as given)."""
    return np.stack([np.asarray(v, dtype=np.float64).reshape(-1) for v in per_layer.values()])


def heatmap_figure(matrix: np.ndarray, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(0.5 * matrix.shape[1] + 2, 0.4 * matrix.shape[0] + 1.5))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


class ExpertStatsCallback:
    """Logs expert statistics to W&B in ``on_round_end``."""

    def _wandb_runs(self, loop: Any) -> list[Any]:
        runs = []
        for logger in loop.fabric.loggers:
            if type(logger).__name__ == "WandbLogger":
                runs.append(logger.experiment)
        return runs

    def on_round_end(self, loop: Any, summary: RoundSummary) -> None:
        runs = self._wandb_runs(loop)
        if not runs or not summary.utilization:
            return
        import matplotlib.pyplot as plt
        import wandb

        payload: dict[str, Any] = {}
        train = utilization_matrix(summary.utilization)
        for i in range(train.shape[0]):
            # One bin per expert, its height the expert's token share: a histogram over expert ids.
            payload[f"experts/train_utilization/layer{i}"] = wandb.Histogram(
                np_histogram=(train[i], np.arange(train.shape[1] + 1))
            )
        fig = heatmap_figure(train, f"training utilization, round {summary.round}")
        payload["experts/train_heatmap"] = wandb.Image(fig)
        plt.close(fig)
        if summary.phi:
            phi = utilization_matrix(summary.phi)
            for i in range(phi.shape[0]):
                payload[f"experts/phi/layer{i}"] = wandb.Histogram(np_histogram=(phi[i], np.arange(phi.shape[1] + 1)))
        for tier, ev in (summary.evaluation or {}).items():
            if ev.utilization:
                matrix = utilization_matrix(ev.utilization)
                fig = heatmap_figure(matrix, f"{tier} (K={ev.k}) evaluation utilization, round {summary.round}")
                payload[f"experts/eval_heatmap/{tier}"] = wandb.Image(fig)
                plt.close(fig)
        for run in runs:
            run.log(payload, step=summary.round)
