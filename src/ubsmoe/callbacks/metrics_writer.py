"""Metrics files, the contract between a run and the notebooks (docs/outputs.md).

``metrics.jsonl``: one record per round and tier (round, tier, beta, K, rank, task
metrics when the round was evaluated, train loss of the tier's clients, FLOPs per
example, per-layer expert-utilization entropy and coefficient of variation, bytes sent
and received, wall time, the tier's clients dropped from the round as faulty
(``dropped_clients``; their reasons are in ``faults.jsonl``) and whether the whole round was
``skipped`` for lack of good replies). ``experts.jsonl``: one record per round with the aggregated
training utilization and phi per layer, and each tier's evaluation utilization.
The same scalars go to the Fabric loggers (W&B, CSV).

Every record carries ``format_version`` (:data:`FORMAT_VERSION`); docs/outputs.md documents
each field with its unit. A change that renames or re-scales a field bumps the version;
adding a field does not.

The records are also kept in memory and checkpointed, so a resumed run rewrites the files
up to the checkpoint's round and continues: the files of a resumed run equal those of an
uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ubsmoe.fl.summary import RoundSummary, expert_cv, expert_entropy


FORMAT_VERSION = 1


def _floats(t: Any) -> list[float]:
    return [round(float(x), 8) for x in t.flatten().tolist()]


class MetricsWriter:
    """Writes ``metrics.jsonl`` and ``experts.jsonl`` and logs per-tier scalars through Fabric."""

    def __init__(self, output_dir: str | Path, *, method: str, task: str, seed: int) -> None:
        self.output_dir = Path(output_dir)
        self.static = {"method": method, "task": task, "seed": seed}
        self.metric_records: list[dict[str, Any]] = []
        self.expert_records: list[dict[str, Any]] = []

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    @property
    def experts_path(self) -> Path:
        return self.output_dir / "experts.jsonl"

    def on_fit_start(self, loop: Any) -> None:
        # Rewrite from memory: empty for a fresh run, the checkpointed history for a resumed one.
        self._rewrite()

    def on_round_end(self, loop: Any, summary: RoundSummary) -> None:
        records = self.tier_records(loop, summary)
        experts = self.expert_record(summary)
        self.metric_records.extend(records)
        self.expert_records.append(experts)
        with self.metrics_path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        with self.experts_path.open("a") as f:
            f.write(json.dumps(experts) + "\n")
        scalars: dict[str, float] = {}
        for r in records:
            prefix = f"tier/{r['tier']}"
            if r["train_loss"] is not None:
                scalars[f"{prefix}/train_loss"] = r["train_loss"]
            for key, value in (r["metrics"] or {}).items():
                scalars[f"{prefix}/val_{key}"] = value
        if summary.evaluation:
            scalars["val/mean_main_metric"] = sum(e.main_metric for e in summary.evaluation.values()) / len(
                summary.evaluation
            )
        scalars["round/seconds"] = summary.round_seconds
        loop.fabric.log_dict(scalars, step=summary.round)

    def tier_records(self, loop: Any, summary: RoundSummary) -> list[dict[str, Any]]:
        records = []
        for tier_index, tier in enumerate(loop.tiers):
            updates = [u for u in summary.updates if u.spec.tier_index == tier_index]
            ev = summary.evaluation.get(tier.name) if summary.evaluation else None
            spec = loop.tier_spec(tier_index)
            n_updates = len(updates)
            flops = ev.flops_per_example if ev else loop.tier_flops(tier_index)
            records.append(
                {
                    "format_version": FORMAT_VERSION,
                    "round": summary.round,
                    "tier": tier.name,
                    "beta": tier.beta,
                    "k": spec.k,
                    "rank": spec.rank,
                    **self.static,
                    "evaluated": ev is not None,
                    "metrics": ev.metrics if ev else None,
                    "main_metric": ev.main_metric if ev else None,
                    "train_loss": sum(u.train_loss for u in updates) / n_updates if n_updates else None,
                    "num_clients": n_updates,
                    "dropped_clients": sum(1 for d in summary.dropped if d.tier == tier.name),
                    "skipped": summary.skipped,
                    "flops_per_example": flops,
                    "flops_ratio_to_dense": round(flops / loop.dense_flops_per_example, 6),
                    "expert_entropy": [expert_entropy(u) for u in ev.utilization.values()] if ev else None,
                    "expert_cv": [expert_cv(u) for u in ev.utilization.values()] if ev else None,
                    "max_load_fraction": list(ev.max_load_fraction.values()) if ev else None,
                    # server -> clients of this tier: their payloads, plus what all of the tier's
                    # clients (sampled or not) receive by broadcast (FLoRA's and FLoRIST's update)
                    "bytes_sent": sum(u.bytes_received for u in updates)
                    + self.broadcast_to_tier(loop, summary, tier_index),
                    "bytes_received": sum(u.bytes_sent for u in updates),  # clients of this tier -> server
                    "wall_time": round(summary.wall_time, 3),
                    # diagnostics (callbacks/grad_bias.py): null on rounds without a measurement
                    "grad_bias": None,
                    "grad_bias_pg": None,
                    **summary.tier_extras.get(tier.name, {}),
                }
            )
        return records

    @staticmethod
    def broadcast_to_tier(loop: Any, summary: RoundSummary, tier_index: int) -> int:
        """The round's broadcast bytes times the number of the tier's clients (all of them, sampled or not)."""
        if not summary.broadcast_bytes:
            return 0
        return summary.broadcast_bytes * sum(1 for spec in loop.specs if spec.tier_index == tier_index)

    @staticmethod
    def expert_record(summary: RoundSummary) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "round": summary.round,
            "train_utilization": {layer: _floats(u) for layer, u in summary.utilization.items()},
            "phi": {layer: _floats(p) for layer, p in summary.phi.items()},
            "eval_utilization": (
                {
                    tier: {layer: _floats(u) for layer, u in ev.utilization.items()}
                    for tier, ev in summary.evaluation.items()
                }
                if summary.evaluation
                else None
            ),
        }

    def _rewrite(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for path, records in ((self.metrics_path, self.metric_records), (self.experts_path, self.expert_records)):
            with path.open("w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"metric_records": list(self.metric_records), "expert_records": list(self.expert_records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.metric_records = list(state["metric_records"])
        self.expert_records = list(state["expert_records"])
