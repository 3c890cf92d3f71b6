"""Typed settings of a run, mirroring the config groups (``model``, ``method``, ``optim``, ``server``, ``tiers``).

The code below the entry points takes these dataclasses rather than a raw Hydra config, so
it can be built from Python (tests, notebooks) without Hydra, and so every field has one
documented type. :func:`group_settings` turns a validated config group into its dataclass
by the dataclass's own fields (nested groups included), so adding a key means adding one
field here; :mod:`ubsmoe.validate` checks the values first.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ubsmoe import names
from ubsmoe.errors import ConfigError


def ranged(default: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Any:  # fmt: skip
    """A field whose value must lie in an interval; :func:`ubsmoe.validate.check_settings_group` reads it."""
    return field(default=default, metadata={"range": (low, high, low_open, high_open)})


def one_of(default: str, choices: tuple[str, ...]) -> Any:
    """A field whose value must be one of ``choices`` (the one place the choices are listed)."""
    return field(default=default, metadata={"choices": tuple(choices)})


@dataclass(frozen=True)
class Tier:
    """A compute tier: clients with budget ``beta`` make up ``share`` of the federation."""

    name: str
    beta: float
    share: float

    def num_experts_active(self, k_max: int) -> int:
        """K_c = max(1, floor(K_max * beta)); K_max = M for a dense FFN cut into M experts."""
        return max(1, math.floor(k_max * self.beta + 1e-9))

    def lora_rank(self, max_rank: int) -> int:
        """r_c = max(1, floor(r * beta))."""
        return max(1, math.floor(max_rank * self.beta + 1e-9))


def resolve_k_max(configured: int | None, num_experts: int, default: int | None = None) -> int:
    """K_max: ``model.k_max`` when set, else the backbone's own active-expert count, else M.

    ``default`` is what the backbone adapter reports (a native MoE model's configured top-k);
    a dense encoder cut into experts has none, and then K_max = M, so the full-budget tier
    runs every expert, i.e. the pretrained FFN itself.
    """
    k_max = configured if configured is not None else (default if default is not None else num_experts)
    if not 1 <= k_max <= num_experts:
        raise ConfigError("model.k_max", k_max, f"null or an integer in [1, model.num_experts={num_experts}]")
    return int(k_max)


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

    name: str = one_of("adamw", names.CLIENT_OPTIMIZERS)
    lr: float = ranged(1e-3, 0.0, low_open=True)
    head_lr: float = ranged(5e-3, 0.0, low_open=True)
    router_lr: float = ranged(1e-3, 0.0, low_open=True)
    phi_lr: float = ranged(1e-2, 0.0, low_open=True)
    weight_decay: float = ranged(0.0, 0.0)
    grad_clip: float | None = ranged(None, 0.0, low_open=True)
    schedule: str = one_of("constant", names.SCHEDULES)  # over rounds
    warmup_rounds: int = ranged(0, 0)
    min_lr_factor: float = ranged(0.0, 0.0, 1.0)  # cosine: the factor the rate decays towards
    step_rounds: int = ranged(1, 1)  # step: rounds between two decays
    step_gamma: float = ranged(0.5, 0.0, 1.0, low_open=True)  # step: factor of each decay


@dataclass
class ServerSettings:
    """The server update after aggregation (Reddi et al., 2021), mirroring ``configs/server/*.yaml``.

    ``fedavg`` with ``lr`` 1 replaces the global state by the aggregate (no optimizer);
    otherwise the change (aggregate minus global) is a pseudo-gradient for a torch optimizer
    (:mod:`ubsmoe.fl.server_optim`). ``tau`` is the adaptivity (eps) of the adaptive ones;
    ``bias_correction`` switches Adam's / Yogi's bias correction (off in the paper);
    ``initial_v`` is their second moment's start v_{-1} (0 as in torch and Flower; the
    paper's analysis takes v_{-1} >= tau^2). ``device`` is where the server state lives
    and every client reply is moved on receipt (:mod:`ubsmoe.fl.devices`).
    """

    optimizer: str = one_of("fedavg", names.SERVER_OPTIMIZERS)
    lr: float = ranged(1.0, 0.0, low_open=True)
    momentum: float = ranged(0.0, 0.0, 1.0, high_open=True)
    betas: tuple[float, float] = (0.9, 0.99)
    tau: float = ranged(1e-3, 0.0, low_open=True)
    bias_correction: bool = False
    initial_v: float = ranged(0.0, 0.0)
    device: str = one_of("cpu", ("cpu", "cuda"))
    # How the clients' tensors are combined wherever a method averages (ubsmoe.fl.aggregators):
    # the (weighted) mean, or a rule robust to poisoned updates.
    aggregator: str = one_of("mean", names.AGGREGATORS)
    trim_fraction: float = ranged(0.1, 0.0, 0.5, high_open=True)  # trimmed_mean: weight share cut from each end
    krum_byzantine: int = ranged(0, 0)  # krum: f, the number of attackers it assumes among a round's clients
    krum_select: int | None = ranged(None, 1)  # krum: clients kept (1 = Krum, more = Multi-Krum; None: n - f)

    @property
    def is_default(self) -> bool:
        """Plain replacement by the aggregate: what every method supports."""
        return self.optimizer == "fedavg" and self.lr == 1.0


@dataclass
class PrivacySettings:
    """Client-level differential privacy (``configs/privacy/*.yaml``; :mod:`ubsmoe.privacy`).

    ``dp``: ``none``, ``fixed`` clip ``clip_norm`` or ``adaptive`` clip (Andrew et al., 2021:
    it tracks the ``adaptive_quantile`` of the update norms at rate ``adaptive_lr``, the
    unclipped count noised with std ``count_noise``, None: clients_per_round / 20).
    ``noise_multiplier`` z, or ``target_epsilon`` (then z is the smallest that meets it at
    ``target_delta`` after ``federation.rounds``; ``noise_multiplier`` must then be null).
    ``public_calibration``: the text a data-driven MoEfication records comes from a public
    source, not from the clients' data (required to combine ``model.moefy`` calibration with DP).
    """

    dp: str = one_of("none", names.DP_MODES)
    clip_norm: float = ranged(1.0, 0.0, low_open=True)
    noise_multiplier: float | None = ranged(1.0, 0.0)
    target_delta: float = ranged(1e-5, 0.0, 1.0, low_open=True, high_open=True)
    target_epsilon: float | None = ranged(None, 0.0, low_open=True)
    adaptive_quantile: float = ranged(0.5, 0.0, 1.0)
    adaptive_lr: float = ranged(0.2, 0.0, low_open=True)
    count_noise: float | None = ranged(None, 0.0, low_open=True)
    public_calibration: bool = False

    @property
    def enabled(self) -> bool:
        return self.dp != "none"


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
    # native: the expert products; auto = grouped_mm on CUDA (no host sync), the per-expert loop on CPU
    expert_kernel: str = one_of("auto", names.EXPERT_KERNELS)
    # native: K_c gates as the family's rule (model: exact at K_c = top-k) or renormalised to sum 1 (smoe/native_layer)
    gate_norm: str = one_of("model", names.GATE_NORMS)
    lora: LoraSettings = field(default_factory=LoraSettings)
    moefy: MoefySettings = field(default_factory=MoefySettings)


@dataclass
class DMRSettings:
    enabled: bool = True
    kappa: float = ranged(1.0, 0.0)
    np_ratio: float = ranged(2.0, 1.0)
    num_candidates: int | None = ranged(4, 1)  # N_p, absolute (the paper's form); None = ceil(np_ratio * K_c)
    zeta: float = ranged(0.5, 0.0, 1.0)
    momentum_source: str = one_of("previous_global", ("previous_global", "local_mean"))  # paper | clients' trained phi
    server_clip: bool = False  # the paper clips only through the local penalty
    phi_min: float = -1.0
    phi_max: float = 1.0
    penalty: float = ranged(0.1, 0.0)
    eps: float = ranged(1e-6, 0.0, low_open=True)


@dataclass
class PGSettings:
    router: bool = False  # the router-side PG (default outputs D_i): the project's addition, off as in the paper
    expert: bool = True
    eta: float = ranged(0.1, 0.0)
    expert_mode: str = one_of("missed_tokens", ("missed_tokens", "shared_mean"))  # shared_mean: g_bar before AdamW
    default_momentum: float = ranged(0.9, 0.0, 1.0, high_open=True)


@dataclass
class SelfPruningSettings:
    """HetLoRA's rank self-pruning: decay factor gamma (None = off) and regularizer strength lambda."""

    gamma: float | None = ranged(None, 0.0, 1.0, low_open=True)
    strength: float = ranged(0.0, 0.0)


@dataclass
class MethodSettings:
    name: str = one_of("ubsmoe", names.METHODS)
    sparse: bool = True
    hetero_rank: bool = False
    dmr: DMRSettings = field(default_factory=DMRSettings)
    pg: PGSettings = field(default_factory=PGSettings)
    tier_scale: bool = False
    balance_loss: float = ranged(0.0, 0.0)
    expert_agg_exponent: float = ranged(0.0, 0.0)
    self_pruning: SelfPruningSettings = field(default_factory=SelfPruningSettings)
    # LoRA scaling of a rank-r_c client: alpha / r_c | alpha / r | 2 (smoe.lora.client_lora_scaling)
    lora_scaling: str = one_of("max_rank", ("per_rank", "max_rank", "constant"))
    homogeneous_rank: str = one_of("full", ("full", "smallest"))  # FedIT: every tier at rank r | at min r_c
    flora_init: str = one_of("independent", ("independent", "shared"))  # FLoRA's fresh adapters: per client | shared
    energy_threshold: float = ranged(0.9, 0.0, 1.0, low_open=True)  # FLoRIST's tau: kept share of the squared singular values


def parse_tiers(raw: Any) -> list[Tier]:
    """The ``tiers`` group as a list of :class:`Tier`, checked: betas in (0, 1], shares sum to 1."""
    if not isinstance(raw, (list, ListConfig)) or len(raw) == 0:
        raise ConfigError("tiers", raw, "a non-empty list of {name, beta, share}")
    tiers: list[Tier] = []
    for i, item in enumerate(raw):
        key = f"tiers[{i}]"
        if not isinstance(item, (dict, DictConfig)) or set(item.keys()) != {"name", "beta", "share"}:
            raise ConfigError(key, item, "a mapping with exactly the keys name, beta, share")
        beta, share = item["beta"], item["share"]
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
            raise ConfigError(f"{key}.beta", beta, "a compute budget in (0, 1]")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"{key}.share", share, "a share of clients in (0, 1]")
        tiers.append(Tier(name=str(item["name"]), beta=float(beta), share=float(share)))
    tier_names = [t.name for t in tiers]
    if len(set(tier_names)) != len(tier_names):
        raise ConfigError("tiers", tier_names, "tier names must be unique")
    total = sum(t.share for t in tiers)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError("tiers", [t.share for t in tiers], f"shares that sum to 1 (they sum to {total:g})")
    return tiers


def settings_fields(cls: type, raw: Any, group: str) -> dict[str, dataclasses.Field]:
    """The fields of the settings dataclass ``cls``, once the group ``raw`` is known to be a mapping
    with only keys ``cls`` has (else a ConfigError naming the group or the first unknown key)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(raw, (dict, DictConfig)):
        raise ConfigError(group, raw, f"a mapping with the keys {sorted(fields)}")
    unknown = sorted(set(raw.keys()) - set(fields))
    if unknown:
        raise ConfigError(f"{group}.{unknown[0]}", raw[unknown[0]], f"a key among {sorted(fields)}")
    return fields


def group_settings(cls: type, raw: Any, group: str) -> Any:
    """The dataclass ``cls`` built from the config group ``raw`` (a plain mapping), nested groups included.

    The dataclass's fields are the group's keys: a key it does not have is an error naming
    it, a missing key keeps the field's default, an integer given for a float field becomes
    a float and a list for a tuple field a tuple.
    """
    settings_fields(cls, raw, group)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        hint = hints[key]
        args = typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            value = group_settings(hint, {} if value is None else value, f"{group}.{key}")
        elif isinstance(value, int) and not isinstance(value, bool) and (hint is float or float in args):
            value = float(value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(float(v) if args and args[0] is float else v for v in value)
        values[key] = value
    return cls(**values)


def _group(cfg: DictConfig, group: str) -> Any:
    return OmegaConf.to_container(OmegaConf.select(cfg, group, throw_on_missing=True), resolve=True)


def optim_settings(cfg: DictConfig) -> OptimSettings:
    """The ``optim`` group as :class:`OptimSettings`."""
    return group_settings(OptimSettings, _group(cfg, "optim"), "optim")


def server_settings(cfg: DictConfig) -> ServerSettings:
    """The ``server`` group as :class:`ServerSettings`."""
    return group_settings(ServerSettings, _group(cfg, "server"), "server")


def privacy_settings(cfg: DictConfig) -> PrivacySettings:
    """The ``privacy`` group as :class:`PrivacySettings` (a config without the group: no DP)."""
    if OmegaConf.select(cfg, "privacy") is None:
        return PrivacySettings()
    return group_settings(PrivacySettings, _group(cfg, "privacy"), "privacy")


def method_settings(cfg: DictConfig) -> MethodSettings:
    """The ``method`` group as :class:`MethodSettings`."""
    return group_settings(MethodSettings, _group(cfg, "method"), "method")


def model_settings(cfg: DictConfig) -> ModelSettings:
    """The ``model`` group as :class:`ModelSettings` (native backbones: ``num_experts`` is the checkpoint's E later)."""
    raw = _group(cfg, "model")
    if isinstance(raw, dict) and raw.get("num_experts") is None:
        raw.pop("num_experts", None)
    return group_settings(ModelSettings, raw, "model")
