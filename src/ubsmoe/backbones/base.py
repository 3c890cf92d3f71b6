"""The backbone-adapter interface: a Hugging Face model in, a frozen model with sparse blocks out.

docs/design.md: the federated engine, the strategies, DMR and PG see only one surface,
whatever the backbone: a dict of sparse blocks (``set_k``, ``phi``, ``router``, telemetry
counters, stacked expert LoRA with the expert as dim 0, PG defaults) and a flat set of
named trainable tensors. A :class:`BackboneAdapter` produces that surface from a model
setting: ``moefy`` cuts a dense encoder's FFNs into experts, ``native`` converts the
sparse blocks that OLMoE / Qwen-MoE / Mixtral already have. The adapter also knows what
the backbone costs (FLOPs per token at a K and a rank) and how many experts it has; the
task (:mod:`ubsmoe.tasks`) decides which head the model carries (``encoder``: hidden
states for a pooled classifier, ``causal_lm``: the model's own LM head).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ubsmoe.errors import ConfigError
from ubsmoe.settings import MethodSettings, ModelSettings, resolve_k_max

HEADS = ("encoder", "causal_lm")


@dataclass
class BuiltBackbone:
    """What :meth:`BackboneAdapter.build` returns.

    ``module``: the (frozen, adapter-injected) Hugging Face model; ``blocks``: layer name ->
    sparse block; ``block_paths``: layer name -> dotted path of the block inside ``module``
    (its tensors are named ``backbone.<path>.<tensor>`` in the trainable state);
    ``rank_tensors``: every LoRA tensor with its rank dimension (for the rank limiter);
    ``hidden_size``: width of the hidden states; ``num_experts``: experts per sparse block.
    """

    module: nn.Module
    blocks: dict[str, nn.Module]
    block_paths: dict[str, str]
    rank_tensors: list[tuple[nn.Parameter, int]]
    hidden_size: int
    num_experts: int
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Calibration:
    """Unlabeled training batches of the task, for constructions that are fitted to data.

    ``batches``: padded model inputs (``input_ids``, ``attention_mask``, optionally
    ``token_type_ids``), no labels; ``cache_dir``: where the fitted construction is cached
    (``None`` = not cached). Adapters whose construction reads no data ignore it.
    """

    batches: list[dict[str, torch.Tensor]]
    cache_dir: str | None = None


class BackboneAdapter(ABC):
    """Turns ``model`` settings into a backbone with UB-SMoE sparse blocks (one kind per subclass)."""

    name: str = ""

    @abstractmethod
    def check(self, model: ModelSettings, method: MethodSettings, head: str) -> Any:
        """Every check that needs no weights (config only); returns the backbone's transformers config."""

    @abstractmethod
    def build(
        self, model: ModelSettings, method: MethodSettings, *, head: str, num_tiers: int, init_seed: int,
        calibration: Calibration | None = None,
    ) -> BuiltBackbone:  # fmt: skip
        """Load the weights, freeze them, insert the sparse blocks and the adapters."""

    @abstractmethod
    def num_experts(self, config: Any, model: ModelSettings) -> int:
        """Experts per sparse block (M for moefy, the model's E for native)."""

    @abstractmethod
    def default_k_max(self, config: Any, model: ModelSettings) -> int:
        """K_max when ``model.k_max`` is null: M for moefy, the model's configured top-k for native."""

    def k_max(self, config: Any, model: ModelSettings) -> int:
        """K_max: ``model.k_max`` checked against the expert count, else :meth:`default_k_max`."""
        value = getattr(model, "k_max", None)
        if isinstance(value, bool) or (value is not None and not isinstance(value, int)):
            raise ConfigError("model.k_max", value, "null (the backbone's default) or an integer")
        return resolve_k_max(value, self.num_experts(config, model), self.default_k_max(config, model))

    def is_router_param(self, name: str) -> bool:
        """Whether a parameter name (in the LightningModule) is a sparse block's router weight."""
        return name.endswith(".router.weight")

    @abstractmethod
    def forward(self, backbone: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        """Run the backbone on a batch; returns the Hugging Face output (hidden states or logits)."""

    @abstractmethod
    def body_flops(self, built: BuiltBackbone, seq_len: int, *, k: int, lora_rank: int, sparse: bool) -> float:
        """Analytic forward FLOPs of one unpadded sequence through the backbone body (no task head)."""

    @abstractmethod
    def reference_body_flops(self, built: BuiltBackbone, seq_len: int, *, lora_rank: int) -> float:
        """The same for the reference model that ``flops_ratio_to_dense`` divides by."""

    def attention_lora_shapes(self, built: BuiltBackbone) -> tuple[tuple[int, int], ...]:
        """(in, out) features of each attention Linear of one layer that carries LoRA."""
        return tuple(built.extras.get("attention_lora_shapes", ()))


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ConfigError("task head", head, f"one of {list(HEADS)}")
