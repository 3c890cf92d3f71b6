"""Small builders shared by tests (not fixtures: plain functions)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import torch
import torchmetrics
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ubsmoe.data.specs import LoaderSpec, PartitionSpec
from ubsmoe.settings import Tier
from ubsmoe.fl.client import ClientSpec, ClientUpdate
from ubsmoe.model import FederatedClassifier
from ubsmoe.settings import MethodSettings, ModelSettings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(PROJECT_ROOT / "configs")


def compose_config(*overrides: str) -> DictConfig:
    """The composed ``train`` config with overrides, outside of a Hydra run."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def grouped_data_args(**flat: object) -> dict[str, object]:
    """A data builder's keywords from one flat mapping: the partition and loader fields become
    ``partition=PartitionSpec(...)`` and ``loader=LoaderSpec(...)``, the rest pass through."""
    args = dict(flat)
    for keyword, spec in (("partition", PartitionSpec), ("loader", LoaderSpec)):
        names = [f.name for f in dataclasses.fields(spec) if f.name in args]
        args[keyword] = spec(**{name: args.pop(name) for name in names})
    return args


def make_update(
    state: dict[str, torch.Tensor],
    num_examples: int,
    *,
    k: int | None = 2,
    expert_tokens: dict[str, torch.Tensor] | None = None,
    tokens: float = 100.0,
    pg_defaults: dict[str, torch.Tensor] | None = None,
    client_id: int = 0,
) -> ClientUpdate:
    tier = Tier("t", 0.5, 1.0)
    telemetry = {
        layer: {"expert_tokens": counts, "tokens": torch.tensor(tokens)} for layer, counts in (expert_tokens or {}).items()
    }
    return ClientUpdate(
        spec=ClientSpec(client_id=client_id, tier=tier, tier_index=0, k=k, rank=None),
        state=state,
        num_examples=num_examples,
        telemetry=telemetry,
        pg_defaults=pg_defaults or {},
        train_loss=0.0,
        num_steps=1,
        bytes_received=0,
        bytes_sent=0,
    )


def run_train_cli(*overrides: str, glue_dir: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """``python src/train.py OVERRIDES`` from the project root, offline, as a user would run it."""
    env = {**os.environ, "GLUE_DIR": str(glue_dir), "WANDB_MODE": "offline", "PYTHONPATH": str(PROJECT_ROOT / "src")}
    return subprocess.run(
        [sys.executable, "src/train.py", *overrides],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def classification_metrics():
    return torchmetrics.MetricCollection({"accuracy": torchmetrics.classification.MulticlassAccuracy(num_classes=2)})


def build(*, sparse=True, num_labels=2, seed=0, model=None, method=None, num_tiers=4):
    metrics = classification_metrics() if num_labels > 1 else torchmetrics.MetricCollection(
        {"pearson": torchmetrics.PearsonCorrCoef()}
    )
    return FederatedClassifier(
        model=model or ModelSettings(dropout=0.0),
        method=method or MethodSettings(sparse=sparse),
        num_labels=num_labels,
        metrics=metrics,
        num_tiers=num_tiers,
        init_seed=seed,
    )


def make_batch(n=8, length=10, regression=False):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, length - 3 :] = 0
    ids[mask == 0] = 0
    labels = torch.rand(n, generator=g) * 5 if regression else torch.arange(n) % 2
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels}
