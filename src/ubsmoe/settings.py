"""Typed settings for the model side, mirroring ``configs/model/*.yaml`` and ``configs/method/*.yaml``.

The model code takes these dataclasses rather than a raw Hydra config, so it can be built
from Python (tests, notebooks) without Hydra, and so every field has one documented type.
``ubsmoe.config`` turns the composed Hydra config into them after validating it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    attention_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    ffn: bool = True


@dataclass
class OptimSettings:
    lr: float = 1e-3
    head_lr: float = 5e-3
    router_lr: float = 1e-3
    phi_lr: float = 1e-2
    weight_decay: float = 0.0


@dataclass
class MoefySettings:
    """How dense FFNs are cut into experts (``model.moefy``).

    The dataclass defaults are the construction that needs no data (``weights``), so a model
    can be built from Python without calibration batches; ``configs/model/minilm.yaml``
    selects the data-driven one (``coactivation``, with ``router_init: fitted``), which
    keeps the sparse model closer to the dense one (``benchmarks/moefy_quality.py``).
    """

    method: str = "weights"  # weights | coactivation
    skip_defaults: bool = False  # add each skipped expert's typical (median) output back
    calibration_examples: int = 256  # training sentences whose activations are recorded


@dataclass
class ModelSettings:
    name: str = "minilm"
    backbone: str = "minilm"
    pooling: str = "mean"
    num_experts: int = 8
    router_init: str = "centroid"  # centroid | zeros | fitted (needs calibration data)
    dropout: float | None = None  # None keeps the backbone's own hidden/attention dropout
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    moefy: MoefySettings = field(default_factory=MoefySettings)


@dataclass
class DMRSettings:
    enabled: bool = True
    kappa: float = 1.0
    np_ratio: float = 2.0
    zeta: float = 0.5
    phi_min: float = -1.0
    phi_max: float = 1.0
    penalty: float = 0.1
    eps: float = 1e-6


@dataclass
class PGSettings:
    router: bool = True
    expert: bool = True
    eta: float = 0.1
    default_momentum: float = 0.9


@dataclass
class SelfPruningSettings:
    """HetLoRA's rank self-pruning: decay factor gamma (None = off) and regularizer strength lambda."""

    gamma: float | None = None
    strength: float = 0.0


@dataclass
class MethodSettings:
    name: str = "ubsmoe"
    sparse: bool = True
    hetero_rank: bool = False
    dmr: DMRSettings = field(default_factory=DMRSettings)
    pg: PGSettings = field(default_factory=PGSettings)
    tier_scale: bool = False
    balance_loss: float = 0.0
    expert_agg_exponent: float = 0.0
    self_pruning: SelfPruningSettings = field(default_factory=SelfPruningSettings)
