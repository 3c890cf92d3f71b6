"""Evaluate one finished run's global model at every compute shape: each K (sparse) or LoRA rank.

A run's per-tier rows in ``metrics.jsonl`` evaluate the final global model once per tier,
at that tier's K_c (or rank r_c), exactly as a client of that tier receives it. For the
sparse methods every tier receives the same state, so those four rows are *one model* at
four K; for the rank methods they are one global adapter truncated (or, FlexLoRA,
re-factored) to four ranks. This sweep fills in every shape from 1 to the model's K_max
(or the full rank), each one built by the run's own strategy as it would build it for a
client of that shape, so a tier's accuracy can be read as a property of the global model
at that shape rather than of the tier's clients.

``python -m ubsmoe.shape_sweep RUN_DIR [--tier NAME] [--out FILE]`` prints a table and
writes JSON (default ``RUN_DIR/shape_sweep.json``): one row per shape with the task's
metrics, the share of examples predicted as each label (classification), and the analytic
forward FLOPs per example relative to the run's dense reference.
``--tier`` names the tier whose identity the payloads carry (default: the full-budget
one; it matters only where a method treats tiers differently, e.g. FLAME's tier scale).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ubsmoe.errors import ConfigError
from ubsmoe.finished_run import FinishedRun, load_finished_run
from ubsmoe.fl.client import load_payload
from ubsmoe.smoe.flops import mean_over_lengths, token_lengths


def predicted_shares(run: FinishedRun, fabric: Any) -> list[float] | None:
    """Classification: the share of evaluation examples predicted as each label (None for regression).

    A model that is right on one class and wrong on the other can have the same accuracy as a
    balanced one; these shares show which it is.
    """
    num_labels = getattr(run.module, "num_labels", None)
    if not num_labels or num_labels < 2:
        return None
    counts = torch.zeros(num_labels, dtype=torch.long)
    for loader in run.data.eval_loaders.values():
        for batch in loader:
            batch = fabric.to_device({k: v for k, v in batch.items() if k != "labels"})
            with fabric.autocast():
                predicted = run.module._logits(batch).argmax(dim=-1).cpu()
            counts += torch.bincount(predicted, minlength=num_labels)
    return (counts.double() / counts.sum()).tolist()


def shapes_of(run: FinishedRun, tier_index: int) -> tuple[str, list[int]]:
    """Which dimension the run's method varies across tiers (``k`` or ``rank``), and its values 1..max."""
    spec = run.tier_specs[tier_index]
    if run.module.sparse:
        return "k", list(range(1, run.module.k_max + 1))
    if run.module.method.hetero_rank:
        return "rank", list(range(1, run.module.model_settings.lora.rank + 1))
    raise ConfigError("run_dir", str(run.cfg.run_name), f"a sparse or rank-heterogeneous method (this run's "
                      f"method {run.cfg.method.name} evaluates one shape, rank {spec.rank})")  # fmt: skip


@torch.no_grad()
def sweep(run: FinishedRun, tier_index: int) -> list[dict[str, Any]]:
    """One row per shape: the global model as a client of that shape (and of tier ``tier_index``) receives it."""
    import lightning as L

    fabric = L.Fabric(accelerator=run.cfg.fabric.accelerator, devices=1, precision=run.cfg.fabric.precision)
    module = fabric.to_device(run.module)
    dimension, values = shapes_of(run, tier_index)
    lengths = token_lengths(run.data.eval_loaders)
    dense = mean_over_lengths(lengths, module.reference_flops_per_example)
    rows = []
    module.eval()
    for value in values:
        spec = dataclasses.replace(run.tier_specs[tier_index], **{dimension: value})
        load_payload(module, spec, run.strategy.configure_client(run.server, spec))
        scored = module.evaluate(run.data.eval_loaders, fabric)
        rows.append({
            dimension: value,
            "tier": spec.tier.name,
            "main_metric": scored.main_metric,
            "metrics": scored.metrics,
            "predicted_shares": predicted_shares(run, fabric),
            "flops_ratio_to_dense": mean_over_lengths(lengths, module.flops_per_example) / dense,
        })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]], label_names: list[str] | None = None) -> str:
    dimension = "k" if "k" in rows[0] else "rank"
    shares = rows[0]["predicted_shares"] is not None
    head = [dimension, "main metric", "FLOPs / dense"]
    if shares:
        names = label_names or [str(i) for i in range(len(rows[0]["predicted_shares"]))]
        head += [f"predicted {name}" for name in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [str(r[dimension]), f"{r['main_metric']:.4f}", f"{r['flops_ratio_to_dense']:.3f}"]
        cells += [f"{x:.3f}" for x in r["predicted_shares"] or []]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ubsmoe.shape_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory (with .hydra/ and checkpoints/)")
    parser.add_argument("--tier", default=None, help="the tier the payloads are built for (default: full budget)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: RUN_DIR/shape_sweep.json)")
    args = parser.parse_args(argv)
    try:
        run = load_finished_run(args.run_dir)
        names = [s.tier.name for s in run.tier_specs]
        if args.tier is None:
            tier_index = max(range(len(names)), key=lambda i: run.tier_specs[i].tier.beta)
        elif args.tier in names:
            tier_index = names.index(args.tier)
        else:
            raise ConfigError("--tier", args.tier, f"one of the run's tiers: {', '.join(names)}")
        rows = sweep(run, tier_index)
    except ConfigError as err:
        print(f"Configuration error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / "shape_sweep.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows, list(getattr(run.task, "label_names", []) or []) or None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
