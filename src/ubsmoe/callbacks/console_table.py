"""A per-tier table of the evaluated metrics on the console after each evaluated round."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ubsmoe.fl.summary import RoundSummary, expert_entropy
from ubsmoe.run_console import RunConsole


class ConsoleTable:
    """Prints tier, beta, K / rank, the task metrics, train loss, GFLOPs and routing balance.

    Which metrics are columns is the task's choice (:meth:`~ubsmoe.tasks.base.Task.console_layout`);
    the rest of a many-metric task's scores follow in a table with one row per metric.
    """

    def __init__(self, console: Any = None) -> None:
        self.console = console or RunConsole()

    def on_round_end(self, loop: Any, summary: RoundSummary) -> None:
        if not summary.evaluation:
            return
        table = Table(title=f"round {summary.round}: global model per tier", show_lines=False)
        task = getattr(loop.module, "task", None)
        all_names = list(next(iter(summary.evaluation.values())).metrics)
        metric_names, detail_names = task.console_layout(all_names) if task is not None else (all_names, [])
        for col in ("tier", "beta", "K", "rank", *metric_names, "train loss", "GFLOPs/ex", "balance"):
            table.add_column(col, justify="right")
        for tier_index, tier in enumerate(loop.tiers):
            ev = summary.evaluation[tier.name]
            losses = [u.train_loss for u in summary.updates if u.spec.tier_index == tier_index]
            balance = [expert_entropy(u) for u in ev.utilization.values()]
            table.add_row(
                tier.name,
                f"{tier.beta:g}",
                "-" if ev.k is None else str(ev.k),
                "-" if ev.rank is None else str(ev.rank),
                *(f"{ev.metrics[m]:.4f}" for m in metric_names),
                f"{sum(losses) / len(losses):.4f}" if losses else "-",
                f"{ev.flops_per_example / 1e9:.3f}",
                f"{sum(balance) / len(balance):.3f}" if balance else "-",
            )
        self.console.print(table)
        if detail_names:
            detail = Table(title=f"round {summary.round}: per metric and tier", show_lines=False)
            for col in ("metric", *(t.name for t in loop.tiers)):
                detail.add_column(col, justify="right")
            for name in detail_names:
                detail.add_row(name, *(f"{summary.evaluation[t.name].metrics[name]:.4f}" for t in loop.tiers))
            self.console.print(detail)
