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
    """The clients' local optimizer (AdamW), mirroring ``configs/optim/*.yaml``.

    ``lr`` is the LoRA adapters' rate; ``head_lr``, ``router_lr``, ``phi_lr`` those of the
    other parameter groups. The round schedule (:func:`ubsmoe.fl.schedule.lr_factor`)
    scales every group's rate by the same factor. ``grad_clip`` is the max total L2 norm of
    the trainable gradients (``None``: no clipping), applied after PG's additions.
    """

    name: str = "adamw"
    lr: float = 1e-3
    head_lr: float = 5e-3
    router_lr: float = 1e-3
    phi_lr: float = 1e-2
    weight_decay: float = 0.0
    grad_clip: float | None = None
    schedule: str = "constant"  # constant | cosine | step (over rounds)
    warmup_rounds: int = 0
    min_lr_factor: float = 0.0  # cosine: the factor the rate decays towards
    step_rounds: int = 1  # step: rounds between two decays
    step_gamma: float = 0.5  # step: factor of each decay


@dataclass
class ServerSettings:
    """The server update after aggregation (Reddi et al., 2021), mirroring ``configs/server/*.yaml``.

    ``fedavg`` with ``lr`` 1 replaces the global state by the aggregate (no optimizer);
    otherwise the change (aggregate minus global) is a pseudo-gradient for a torch optimizer
    (:mod:`ubsmoe.fl.server_optim`). ``tau`` is the adaptivity (eps) of the adaptive ones;
    ``bias_correction`` switches Adam's / Yogi's bias correction (off in the paper);
    ``initial_v`` is their second moment's start v_{-1} (0 as in torch and Flower; the
    paper's analysis takes v_{-1} >= tau^2).
    """

    optimizer: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    tau: float = 1e-3
    bias_correction: bool = False
    initial_v: float = 0.0

    @property
    def is_default(self) -> bool:
        """Plain replacement by the aggregate: what every method supports."""
        return self.optimizer == "fedavg" and self.lr == 1.0


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
    adapter: str = "moefy"  # moefy (dense encoder cut into experts) | native (sparse decoder's own experts)
    pooling: str = "mean"
    num_experts: int = 8
    router_init: str = "centroid"  # centroid | zeros | fitted (needs calibration data)
    dropout: float | None = None  # None keeps the backbone's own hidden/attention dropout
    k_max: int | None = None  # None: M for moefy, the checkpoint's configured top-k for native
    dtype: str = "float32"  # native: weights' dtype when loading (bfloat16 for the hub checkpoints)
    pretrained: bool = True  # native: false = random init from the config (tiny CPU models)
    router_dtype: str | None = "float32"  # native: the trainable router's dtype (None = the weights' dtype)
    gradient_checkpointing: bool = False  # native: recompute each decoder layer in backward (less activation memory)
    lora: LoraSettings = field(default_factory=LoraSettings)
    moefy: MoefySettings = field(default_factory=MoefySettings)


@dataclass
class DMRSettings:
    enabled: bool = True
    kappa: float = 1.0
    np_ratio: float = 2.0
    num_candidates: int | None = 4  # N_p, absolute (the paper's form); None = ceil(np_ratio * K_c)
    zeta: float = 0.5
    momentum_source: str = "previous_global"  # previous_global (paper) | local_mean (clients' trained phi)
    server_clip: bool = False  # the paper clips only through the local penalty
    phi_min: float = -1.0
    phi_max: float = 1.0
    penalty: float = 0.1
    eps: float = 1e-6


@dataclass
class PGSettings:
    router: bool = True
    expert: bool = True
    eta: float = 0.1
    expert_mode: str = "missed_tokens"  # missed_tokens | shared_mean (the first design, g_bar before AdamW)
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
    lora_scaling: str = "max_rank"  # per_rank (alpha / r_c) | max_rank (alpha / r for every rank)
    homogeneous_rank: str = "full"  # FedIT: full (every tier at rank r) | smallest (every tier at min r_c)
    flora_init: str = "independent"  # FLoRA's fresh adapters: independent (per client) | shared
    energy_threshold: float = 0.9  # FLoRIST's tau: kept share of the squared singular values
