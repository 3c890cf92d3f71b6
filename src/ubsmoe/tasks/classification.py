"""GLUE classification / regression on the pooled hidden states of an encoder (docs/paper.md).

The behaviour the framework always had, moved out of the LightningModule: a linear head on
the attention-masked mean (``model.pooling: mean``) or the first token (``cls``) of the last
hidden states; cross-entropy (or MSE for one output, STS-B); torchmetrics per evaluation
split, with the split name as a prefix when there is more than one (MNLI).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from ubsmoe.errors import ConfigError
from ubsmoe.names import POOLINGS
from ubsmoe.tasks.base import Task, TaskEvaluation, TaskModel


class ClassificationTask(Task):
    """A pooled linear head with ``num_labels`` outputs (1 = regression) scored by ``metrics``."""

    head = "encoder"

    def __init__(
        self, *, num_labels: int, metrics: torchmetrics.MetricCollection, pooling: str, main_metric: str = "accuracy"
    ) -> None:
        if num_labels < 1:
            raise ConfigError("num_labels", num_labels, "an integer >= 1 (1 = regression)")
        if pooling not in POOLINGS:
            raise ConfigError("model.pooling", pooling, f"one of {list(POOLINGS)}")
        self.num_labels = num_labels
        self.metrics = metrics
        self.pooling = pooling
        self.main_metric = main_metric
        self._loss_sum = 0.0
        self._count = 0

    def build_head(self, hidden_size: int, generator: torch.Generator) -> nn.Module:
        head = nn.Linear(hidden_size, self.num_labels)
        with torch.no_grad():
            bound = 1.0 / hidden_size**0.5
            head.weight.copy_(torch.rand(head.weight.shape, generator=generator) * 2 * bound - bound)
            head.bias.zero_()
        return head

    def logits(self, module: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"].bool()
        module.set_token_mask(mask)
        hidden = module.adapter.forward(module.backbone, batch).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        logits = module.head(pooled)
        return logits.squeeze(-1) if self.num_labels == 1 else logits

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_labels == 1:
            return F.mse_loss(logits, labels.to(logits.dtype))
        return F.cross_entropy(logits, labels)

    def loss(self, module: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task_loss(self.logits(module, batch), batch["labels"])

    @torch.no_grad()
    def validation_step(self, module: TaskModel, batch: dict[str, torch.Tensor]) -> None:
        logits = self.logits(module, batch)
        labels = batch["labels"]
        loss = self.task_loss(logits, labels)
        self._loss_sum += float(loss) * labels.shape[0]
        self._count += labels.shape[0]
        preds = logits if self.num_labels == 1 else logits.argmax(dim=-1)
        self.metrics.update(preds, labels)

    def compute_validation(self) -> dict[str, float]:
        values = {name: float(value) for name, value in self.metrics.compute().items()}
        values["loss"] = self._loss_sum / max(self._count, 1)
        self.metrics.reset()
        self._loss_sum, self._count = 0.0, 0
        return values

    def evaluate(self, module: TaskModel, loaders: Mapping[str, Any], fabric: Any) -> TaskEvaluation:
        metrics: dict[str, float] = {}
        for split, loader in loaders.items():
            for batch in loader:
                with fabric.autocast():
                    self.validation_step(module, fabric.to_device(batch))
            values = self.compute_validation()
            prefix = "" if len(loaders) == 1 else f"{split}/"
            metrics.update({f"{prefix}{k}": v for k, v in values.items()})
        first_prefix = "" if len(loaders) == 1 else f"{next(iter(loaders))}/"
        return TaskEvaluation(metrics=metrics, main_metric=metrics[f"{first_prefix}{self.main_metric}"])

    def head_flops(self, hidden_size: int, seq_len: int) -> float:
        return 2.0 * hidden_size * self.num_labels
