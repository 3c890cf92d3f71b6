"""The task interface: what a model predicts, how it is trained and how it is scored.

docs/design.md: the LightningModule composes one backbone adapter
(:mod:`ubsmoe.backbones`) and one :class:`Task`. The task owns the head (if any), the loss,
the batch format and the evaluation; the federated loop calls only :meth:`Task.evaluate`
and reads the returned metrics and main metric, so GLUE classification and per-benchmark
commonsense evaluation fit the same ``metrics.jsonl`` contract.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


class BackboneRunner(Protocol):
    """The one thing a task asks of a backbone adapter: run the backbone on a batch."""

    def forward(self, backbone: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        """The Hugging Face output of ``backbone`` on ``batch`` (hidden states or LM logits)."""
        ...


class TaskModel(Protocol):
    """What a task uses of the model it is composed into (``ubsmoe.model.FederatedModel``).

    Spelled out here so that a task depends only on this interface, not on the module that
    owns it: the backbone and its adapter, the head the task built (tasks with one), and the
    real-token mask that keeps padding out of the sparse blocks' routing.
    """

    @property
    def adapter(self) -> BackboneRunner: ...

    @property
    def backbone(self) -> nn.Module: ...

    @property
    def head(self) -> nn.Module: ...

    def set_token_mask(self, mask: torch.Tensor | None) -> None: ...


@dataclass
class TaskEvaluation:
    """Flat metrics (name -> float) of one evaluation and the value of the task's main metric."""

    metrics: dict[str, float]
    main_metric: float


class Task(ABC):
    """One kind of task; a subclass per kind, an instance per run."""

    #: which output the backbone must provide: "encoder" (hidden states) or "causal_lm" (LM logits)
    head: str = "encoder"

    @abstractmethod
    def build_head(self, hidden_size: int, generator: torch.Generator) -> nn.Module | None:
        """The trainable head on top of the backbone (``None``: the backbone's own output is the prediction)."""

    @abstractmethod
    def logits(self, module: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The prediction of one batch (class logits, or LM logits)."""

    @abstractmethod
    def loss(self, module: TaskModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The task loss of one training batch (the module adds its regularizers)."""

    @abstractmethod
    def evaluate(self, module: TaskModel, loaders: Mapping[str, Any], fabric: Any) -> TaskEvaluation:
        """Score the module (already at the tier's K / rank, in eval mode) on every evaluation loader."""

    @abstractmethod
    def head_flops(self, hidden_size: int, seq_len: int) -> float:
        """Forward FLOPs of the head for one example of ``seq_len`` tokens."""

    def console_layout(self, metric_names: list[str]) -> tuple[list[str], list[str]]:
        """Which metrics the console shows: (columns of the per-tier table, rows of a per-metric table).

        Every metric stays in ``metrics.jsonl``; a task with many metrics moves the detail into
        the second table (one row per metric, one column per tier) so the first stays readable.
        """
        return metric_names, []

    def validation_step(self, module: TaskModel, batch: dict[str, torch.Tensor]) -> None:
        """Accumulate one evaluation batch (tasks whose metrics accumulate per batch)."""
        raise NotImplementedError(f"{type(self).__name__} scores whole evaluation sets: use evaluate()")

    def compute_validation(self) -> dict[str, float]:
        """The metrics accumulated by :meth:`validation_step` (then reset)."""
        raise NotImplementedError(f"{type(self).__name__} scores whole evaluation sets: use evaluate()")
