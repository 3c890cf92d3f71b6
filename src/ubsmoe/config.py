"""Validation of the composed Hydra config, and its conversion into typed settings.

Every value a user may get wrong is checked here, before any data is loaded or any model
built, and each failure is one :class:`~ubsmoe.errors.ConfigError` naming the key, the
value, and what is allowed. Checks that need the data (a split missing from the local
directory, more clients than examples) live next to the data code and also run before
training starts.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ubsmoe.errors import ConfigError
from ubsmoe.settings import (
    DMRSettings,
    LoraSettings,
    MethodSettings,
    ModelSettings,
    MoefySettings,
    OptimSettings,
    PGSettings,
    SelfPruningSettings,
    ServerSettings,
)

if TYPE_CHECKING:
    from ubsmoe.fl.faults import FaultPolicy

LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("offline", "online", "disabled")
POOLINGS = ("mean", "cls")
ROUTER_INITS = ("centroid", "zeros", "fitted")
MOEFY_METHODS = ("weights", "coactivation")
PARTITIONS = ("dirichlet", "iid")
ACCELERATORS = ("cpu", "cuda", "mps", "auto")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "64-true")
ADAPTERS = ("moefy", "native")  # model.adapter (ubsmoe.backbones.ADAPTERS)
DATA_KINDS = ("glue", "commonsense")  # data.kind: GLUE classification | commonsense instruction tuning
MODEL_DTYPES = ("float32", "bfloat16", "float16")
EVAL_MODES = ("likelihood", "generation", "both")
PARTITION_BY = ("source", "answer")
MOMENTUM_SOURCES = ("previous_global", "local_mean")
PG_EXPERT_MODES = ("missed_tokens", "shared_mean")
LORA_SCALINGS = ("per_rank", "max_rank")
HOMOGENEOUS_RANKS = ("full", "smallest")
FLORA_INITS = ("independent", "shared")
CLIENT_OPTIMIZERS = ("adamw",)


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


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def _require_int(cfg: DictConfig, key: str, minimum: int, maximum: int | None = None) -> int:
    value = _get(cfg, key)
    upper = "" if maximum is None else f" and at most {maximum}"
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
        maximum is not None and value > maximum
    ):
        raise ConfigError(key, value, f"an integer at least {minimum}{upper}")
    return value


def _require_float(
    cfg: DictConfig,
    key: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    value = _get(cfg, key)
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    allowed = f"a number in {interval}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, allowed)
    v = float(value)
    if (low is not None and (v < low or (low_open and v == low))) or (
        high is not None and (v > high or (high_open and v == high))
    ):
        raise ConfigError(key, value, allowed)
    return v


def _require_choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> str:
    value = _get(cfg, key)
    if value not in choices:
        raise ConfigError(key, value, f"one of {', '.join(choices)}")
    return value


def _require_bool(cfg: DictConfig, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


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
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise ConfigError("tiers", names, "tier names must be unique")
    total = sum(t.share for t in tiers)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError("tiers", [t.share for t in tiers], f"shares that sum to 1 (they sum to {total:g})")
    return tiers


def validate(cfg: DictConfig) -> list[Tier]:
    """Check every user-facing value of a composed config; return the parsed tiers.

    Unknown keys come first: a misspelled key would otherwise be ignored (or crash later).
    """
    from ubsmoe.schema import check_known_keys

    check_known_keys(cfg)
    _require_int(cfg, "seed", 0)
    _require_bool(cfg, "debug")
    _require_bool(cfg, "dry_run")

    from ubsmoe.fl.strategies import METHODS  # the strategy registry is the one list of methods

    _require_choice(cfg, "method.name", METHODS)
    _require_bool(cfg, "method.sparse")
    _require_bool(cfg, "method.hetero_rank")
    _require_bool(cfg, "method.dmr.enabled")
    _require_float(cfg, "method.dmr.kappa", 0.0)
    _require_float(cfg, "method.dmr.np_ratio", 1.0)
    if _get(cfg, "method.dmr.num_candidates") is not None:
        _require_int(cfg, "method.dmr.num_candidates", 1)
    _require_float(cfg, "method.dmr.zeta", 0.0, 1.0)
    _require_choice(cfg, "method.dmr.momentum_source", MOMENTUM_SOURCES)
    _require_bool(cfg, "method.dmr.server_clip")
    phi_min = _require_float(cfg, "method.dmr.phi_min")
    phi_max = _require_float(cfg, "method.dmr.phi_max")
    if phi_min >= phi_max:
        raise ConfigError("method.dmr.phi_min", phi_min, f"a number below method.dmr.phi_max ({phi_max:g})")
    _require_float(cfg, "method.dmr.penalty", 0.0)
    _require_float(cfg, "method.dmr.eps", 0.0, low_open=True)
    _require_bool(cfg, "method.pg.router")
    _require_bool(cfg, "method.pg.expert")
    _require_float(cfg, "method.pg.eta", 0.0)
    _require_choice(cfg, "method.pg.expert_mode", PG_EXPERT_MODES)
    _require_float(cfg, "method.pg.default_momentum", 0.0, 1.0, high_open=True)
    _require_bool(cfg, "method.tier_scale")
    _require_float(cfg, "method.balance_loss", 0.0)
    _require_float(cfg, "method.expert_agg_exponent", 0.0)
    _require_choice(cfg, "method.lora_scaling", LORA_SCALINGS)
    _require_choice(cfg, "method.homogeneous_rank", HOMOGENEOUS_RANKS)
    _require_choice(cfg, "method.flora_init", FLORA_INITS)
    _require_float(cfg, "method.energy_threshold", 0.0, 1.0, low_open=True)
    if OmegaConf.select(cfg, "method.self_pruning.gamma") is not None:
        _require_float(cfg, "method.self_pruning.gamma", 0.0, 1.0, low_open=True)
        _require_float(cfg, "method.self_pruning.strength", 0.0)

    adapter = _optional(cfg, "model.adapter", "moefy")
    if adapter not in ADAPTERS:
        raise ConfigError("model.adapter", adapter, f"one of {', '.join(ADAPTERS)}")
    kind = _optional(cfg, "data.kind", "glue")
    if kind not in DATA_KINDS:
        raise ConfigError("data.kind", kind, f"one of {', '.join(DATA_KINDS)}")
    if adapter == "moefy":
        num_experts = _require_int(cfg, "model.num_experts", 1)
        if _optional(cfg, "model.k_max", None) is not None:
            _require_int(cfg, "model.k_max", 1, num_experts)
        _warn_candidates(cfg, num_experts)
        _require_choice(cfg, "model.pooling", POOLINGS)
        _require_choice(cfg, "model.router_init", ROUTER_INITS)
        if OmegaConf.select(cfg, "model.moefy") is not None:
            _require_choice(cfg, "model.moefy.method", MOEFY_METHODS)
            _require_bool(cfg, "model.moefy.skip_defaults")
            _require_int(cfg, "model.moefy.calibration_examples", 1)
        if kind != "glue":
            raise ConfigError(
                "model.adapter", adapter, f"native for data.kind={kind} (a causal decoder; moefy cuts encoders)"
            )
    else:
        if _optional(cfg, "model.num_experts", None) is not None:
            raise ConfigError(
                "model.num_experts", _get(cfg, "model.num_experts"), "null for native backbones (E is the checkpoint's)"
            )
        if _optional(cfg, "model.dtype", "float32") not in MODEL_DTYPES:
            raise ConfigError("model.dtype", _get(cfg, "model.dtype"), f"one of {', '.join(MODEL_DTYPES)}")
        router_dtype = _optional(cfg, "model.router_dtype", "float32")
        if router_dtype is not None and router_dtype not in MODEL_DTYPES:
            allowed = f"null (the weights' dtype) or one of {', '.join(MODEL_DTYPES)}"
            raise ConfigError("model.router_dtype", router_dtype, allowed)
        for key in ("model.pretrained", "model.gradient_checkpointing"):
            if not isinstance(_optional(cfg, key, False), bool):
                raise ConfigError(key, _get(cfg, key), "true or false")
        if kind == "glue":
            raise ConfigError(
                "model.adapter", adapter, "moefy for data.kind=glue (native backbones train instruction tasks)"
            )
    if _optional(cfg, "model.k_max", None) is not None:
        _require_int(cfg, "model.k_max", 1)  # the upper bound (M or E) is checked with the backbone's config
    if _get(cfg, "model.dropout") is not None:
        _require_float(cfg, "model.dropout", 0.0, 1.0, high_open=True)
    if not isinstance(_get(cfg, "model.backbone"), str) or not _get(cfg, "model.backbone"):
        raise ConfigError("model.backbone", _get(cfg, "model.backbone"), "'minilm', a hub id or a local directory")
    _require_int(cfg, "model.lora.rank", 1)
    _require_float(cfg, "model.lora.alpha", 0.0, low_open=True)
    _require_float(cfg, "model.lora.dropout", 0.0, 1.0, high_open=True)
    _require_bool(cfg, "model.lora.ffn")
    if OmegaConf.select(cfg, "model.optim") is not None:  # a config written for the old layout
        raise ConfigError(
            "model.optim",
            OmegaConf.to_container(cfg.model.optim),
            "nothing: the keys moved to the optim group (optim.lr, ...)",
        )
    _validate_optim(cfg)
    _validate_server(cfg)

    _require_int(cfg, "data.max_length", 8, 4096)
    _require_int(cfg, "data.batch_size", 1)
    _require_int(cfg, "data.eval_batch_size", 1)
    for key in ("data.max_train_examples", "data.max_eval_examples"):
        if _get(cfg, key) is not None:
            _require_int(cfg, key, 1)
    if kind == "glue":
        _require_int(cfg, "data.regression_buckets", 2)
    else:
        _validate_commonsense(cfg)

    num_clients = _require_int(cfg, "federation.num_clients", 1)
    per_round = _require_int(cfg, "federation.clients_per_round", 1)
    if per_round > num_clients:
        raise ConfigError(
            "federation.clients_per_round", per_round, f"at most federation.num_clients ({num_clients})"
        )
    _require_int(cfg, "federation.rounds", 1)
    steps, epochs = _get(cfg, "federation.local_steps"), _get(cfg, "federation.local_epochs")
    if (steps is None) == (epochs is None):
        raise ConfigError(
            "federation.local_steps", steps, "exactly one of local_steps and local_epochs set (the other null)"
        )
    if steps is not None:
        _require_int(cfg, "federation.local_steps", 1)
    else:
        _require_int(cfg, "federation.local_epochs", 1)
    _require_choice(cfg, "federation.partition", PARTITIONS)
    _require_float(cfg, "federation.dirichlet_alpha", 0.0, low_open=True)
    _require_int(cfg, "federation.min_client_size", 1)
    _require_int(cfg, "federation.eval_every", 1)
    _validate_faults(cfg, per_round)
    _require_float(cfg, "federation.prox_mu", 0.0)

    _require_choice(cfg, "logger.name", LOGGERS)
    if _get(cfg, "logger.name") == "wandb":
        _require_choice(cfg, "logger.mode", WANDB_MODES)
    _require_choice(cfg, "fabric.accelerator", ACCELERATORS)
    if str(_get(cfg, "fabric.precision")) not in PRECISIONS:
        raise ConfigError("fabric.precision", _get(cfg, "fabric.precision"), f"one of {', '.join(PRECISIONS)}")
    from ubsmoe.fl.backends import BACKENDS

    BACKENDS[_require_choice(cfg, "backend.name", tuple(BACKENDS))].check_config(cfg)  # each checks its own keys
    if OmegaConf.select(cfg, "diagnostics.every") is not None:
        _require_int(cfg, "diagnostics.every", 1)
        _require_int(cfg, "diagnostics.probe_examples", 1)
    for key in ("dmr", "expert_stats", "metrics_writer", "checkpoint"):
        _require_bool(cfg, f"callbacks.{key}")
    _require_int(cfg, "checkpoint.keep", 1)

    resume = _get(cfg, "resume")
    if resume is not None and not isinstance(resume, bool) and not Path(str(resume)).exists():
        raise ConfigError("resume", resume, "null, true (latest checkpoint in the run directory) or an existing path")
    if resume is False:
        raise ConfigError("resume", resume, "null, true or a checkpoint path (false is spelled null)")

    tiers = parse_tiers(_get(cfg, "tiers"))
    if OmegaConf.select(cfg, "federation.centralized", default=False) is not False:
        _require_bool(cfg, "federation.centralized")
        names = tuple(t.name for t in tiers)
        tier = OmegaConf.select(cfg, "federation.tier", default=None)
        if tier not in names:
            raise ConfigError("federation.tier", tier, f"the tier a centralized run trains, one of {', '.join(names)}")
        if steps is None:
            raise ConfigError("federation.local_steps", steps, "an integer: centralized runs match the local steps")
    return tiers


def _validate_faults(cfg: DictConfig, per_round: int) -> None:
    """``federation.{min_replies, max_update_norm, round_timeout}`` and ``federation.faults.*``."""
    from ubsmoe.fl.faults import FAULT_KINDS

    _require_int(cfg, "federation.min_replies", 1, per_round)
    for key in ("federation.max_update_norm", "federation.round_timeout"):
        if _get(cfg, key) is not None:
            _require_float(cfg, key, 0.0, low_open=True)
    faults = _get(cfg, "federation.faults")
    allowed = {*FAULT_KINDS, "straggler_delay"}
    if not isinstance(faults, (dict, DictConfig)):
        raise ConfigError("federation.faults", faults, f"a mapping with the keys {sorted(allowed)}")
    unknown = sorted(set(faults.keys()) - allowed)
    if unknown:
        raise ConfigError(f"federation.faults.{unknown[0]}", faults[unknown[0]], f"a key among {sorted(allowed)}")
    total = sum(_require_float(cfg, f"federation.faults.{kind}", 0.0, 1.0) for kind in FAULT_KINDS)
    if total > 1.0 + 1e-9:
        raise ConfigError(
            "federation.faults", {k: faults[k] for k in FAULT_KINDS}, f"probabilities that sum to at most 1 (they sum to {total:g})"
        )
    _require_float(cfg, "federation.faults.straggler_delay", 0.0)


def fault_policy(cfg: DictConfig) -> FaultPolicy:
    """The validated fault settings of ``federation`` as a :class:`~ubsmoe.fl.faults.FaultPolicy`."""
    from ubsmoe.fl.faults import FAULT_KINDS, FaultInjection, FaultPolicy

    fed = cfg.federation
    injection = FaultInjection(
        **{kind: float(fed.faults[kind]) for kind in FAULT_KINDS},
        straggler_delay=float(fed.faults.straggler_delay),
    )
    return FaultPolicy(
        injection=injection,
        min_replies=int(fed.min_replies),
        max_update_norm=None if fed.max_update_norm is None else float(fed.max_update_norm),
        round_timeout=None if fed.round_timeout is None else float(fed.round_timeout),
    )


def _optional(cfg: DictConfig, key: str, default: Any) -> Any:
    """A key that older configs may not have (its documented default then)."""
    return OmegaConf.select(cfg, key, default=default)


def _validate_commonsense(cfg: DictConfig) -> None:
    """The ``data`` keys of ``data.kind: commonsense`` (configs/data/commonsense.yaml)."""
    from ubsmoe.data.commonsense import BENCHMARKS

    _require_choice(cfg, "data.eval_mode", EVAL_MODES)
    _require_int(cfg, "data.max_new_tokens", 1)
    _require_choice(cfg, "data.partition_by", PARTITION_BY)
    source = _get(cfg, "data.train_source")
    if not isinstance(source, str) or not source:
        raise ConfigError("data.train_source", source, "'local', a JSON path or URL, or a hub dataset id")
    if not isinstance(_get(cfg, "data.likelihood_prefix"), str):
        raise ConfigError("data.likelihood_prefix", _get(cfg, "data.likelihood_prefix"), "a string (may be empty)")
    for key, allow_empty in (("data.eval_benchmarks", False), ("data.train_benchmarks", True)):
        value = _get(cfg, key)
        if not isinstance(value, (list, ListConfig)) or (not value and not allow_empty):
            allowed = f"a {'' if allow_empty else 'non-empty '}list of benchmarks among {list(BENCHMARKS)}"
            raise ConfigError(key, value, allowed)
        for name in value:
            if name not in BENCHMARKS:
                raise ConfigError(key, name, f"benchmarks among {list(BENCHMARKS)}")
        if len(set(value)) != len(value):
            raise ConfigError(key, list(value), "each benchmark at most once")
    if _get(cfg, "data.train_source") == "local" and not _get(cfg, "data.train_benchmarks"):
        raise ConfigError("data.train_benchmarks", [], "at least one benchmark when data.train_source is 'local'")
    hub = _get(cfg, "data.hub_test_files")
    if hub is not None and (
        not isinstance(hub, (dict, DictConfig))
        or any(k not in BENCHMARKS or not isinstance(v, str) for k, v in hub.items())
    ):
        raise ConfigError(
            "data.hub_test_files", hub, f"a mapping benchmark -> path/URL/hub id, benchmarks among {list(BENCHMARKS)}"
        )


def _warn_candidates(cfg: DictConfig, num_experts: int) -> None:
    """Warn when DMR's candidate set is every expert: then phi biases all of them, not a short list."""
    n_p = _get(cfg, "method.dmr.num_candidates")
    if _get(cfg, "method.sparse") and _get(cfg, "method.dmr.enabled") and n_p is not None and n_p >= num_experts:
        warnings.warn(
            f"method.dmr.num_candidates={n_p} >= model.num_experts={num_experts}: every expert is a candidate, "
            "so phi biases all of them (the paper has N_p << M)",
            UserWarning,
            stacklevel=2,
        )


def _check_known_keys(cfg: DictConfig, group: str, settings: type) -> dict[str, Any]:
    """The group as a dict; a key the settings dataclass does not have is an error, not ignored."""
    raw = OmegaConf.to_container(_get(cfg, group), resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError(group, raw, f"a mapping with the keys {sorted(settings.__dataclass_fields__)}")
    allowed = set(settings.__dataclass_fields__)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{group}.{unknown[0]}", raw[unknown[0]], f"a key among {sorted(allowed)}")
    return raw


def _validate_optim(cfg: DictConfig) -> None:
    """The clients' optimizer group ``optim`` (configs/optim/adamw.yaml)."""
    from ubsmoe.fl.schedule import SCHEDULES

    _check_known_keys(cfg, "optim", OptimSettings)
    _require_choice(cfg, "optim.name", CLIENT_OPTIMIZERS)
    for key in ("lr", "head_lr", "router_lr", "phi_lr"):
        _require_float(cfg, f"optim.{key}", 0.0, low_open=True)
    _require_float(cfg, "optim.weight_decay", 0.0)
    if _get(cfg, "optim.grad_clip") is not None:
        _require_float(cfg, "optim.grad_clip", 0.0, low_open=True)
    _require_choice(cfg, "optim.schedule", tuple(SCHEDULES))
    _require_int(cfg, "optim.warmup_rounds", 0)
    _require_float(cfg, "optim.min_lr_factor", 0.0, 1.0)
    _require_int(cfg, "optim.step_rounds", 1)
    _require_float(cfg, "optim.step_gamma", 0.0, 1.0, low_open=True)


def _validate_server(cfg: DictConfig) -> None:
    """The server update group ``server`` (configs/server/*.yaml), and whether the method can take it."""
    from ubsmoe.fl.server_optim import SERVER_OPTIMIZERS, check_server_optimizer
    from ubsmoe.fl.strategies import StrategyContext, build_strategy

    _check_known_keys(cfg, "server", ServerSettings)
    optimizer = _require_choice(cfg, "server.optimizer", tuple(SERVER_OPTIMIZERS))
    _require_float(cfg, "server.lr", 0.0, low_open=True)
    momentum = _require_float(cfg, "server.momentum", 0.0, 1.0, high_open=True)
    if momentum != 0.0 and optimizer != "fedavgm":
        raise ConfigError("server.momentum", momentum, "0 unless server.optimizer=fedavgm (the only one with momentum)")
    betas = _get(cfg, "server.betas")
    if (
        not isinstance(betas, (list, ListConfig))
        or len(betas) != 2
        or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0 for b in betas)
    ):
        shown = list(betas) if isinstance(betas, ListConfig) else betas
        raise ConfigError("server.betas", shown, "two numbers [beta_1, beta_2], each in [0, 1)")
    _require_float(cfg, "server.tau", 0.0, low_open=True)
    _require_bool(cfg, "server.bias_correction")
    initial_v = _require_float(cfg, "server.initial_v", 0.0)
    if initial_v != 0.0 and optimizer in ("fedavg", "fedavgm"):
        raise ConfigError("server.initial_v", initial_v, "0 unless server.optimizer is fedadam, fedyogi or fedadagrad")
    # The method decides (Strategy.supports_server_optimizer); building it is cheap and
    # needs no model, so the placeholder context only serves the constructor.
    strategy = build_strategy(method_settings(cfg), StrategyContext(expert_tensor_names=[], lora_scaling=1.0, seed=0))
    check_server_optimizer(server_settings(cfg), strategy, method_name=str(_get(cfg, "method.name")))


def optim_settings(cfg: DictConfig) -> OptimSettings:
    """The validated ``optim`` group as :class:`OptimSettings`."""
    return OptimSettings(**_check_known_keys(cfg, "optim", OptimSettings))


def server_settings(cfg: DictConfig) -> ServerSettings:
    """The validated ``server`` group as :class:`ServerSettings`."""
    raw = _check_known_keys(cfg, "server", ServerSettings)
    raw["betas"] = tuple(float(b) for b in raw["betas"])
    raw["lr"], raw["tau"] = float(raw["lr"]), float(raw["tau"])
    raw["momentum"], raw["initial_v"] = float(raw["momentum"]), float(raw["initial_v"])
    return ServerSettings(**raw)


def model_settings(cfg: DictConfig) -> ModelSettings:
    """The validated ``model`` group as :class:`ModelSettings`."""
    raw = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(raw, dict)
    defaults = ModelSettings()
    return ModelSettings(
        name=raw["name"],
        backbone=raw["backbone"],
        adapter=raw.get("adapter", defaults.adapter),
        pooling=raw.get("pooling", defaults.pooling),
        num_experts=raw.get("num_experts") or defaults.num_experts,  # native: replaced by the checkpoint's E
        router_init=raw.get("router_init", defaults.router_init),
        dropout=raw.get("dropout"),
        k_max=raw.get("k_max"),
        dtype=raw.get("dtype", defaults.dtype),
        pretrained=raw.get("pretrained", defaults.pretrained),
        gradient_checkpointing=raw.get("gradient_checkpointing", defaults.gradient_checkpointing),
        router_dtype=raw.get("router_dtype", defaults.router_dtype),
        lora=LoraSettings(**raw["lora"]),
        moefy=MoefySettings(**raw.get("moefy", {})),
    )


def method_settings(cfg: DictConfig) -> MethodSettings:
    """The validated ``method`` group as :class:`MethodSettings` (unknown keys are an error, not ignored)."""
    raw = OmegaConf.to_container(cfg.method, resolve=True)
    assert isinstance(raw, dict)
    allowed = set(MethodSettings.__dataclass_fields__)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"method.{unknown[0]}", raw[unknown[0]], f"a key among {sorted(allowed)}")
    return MethodSettings(
        name=raw["name"],
        sparse=raw["sparse"],
        hetero_rank=raw["hetero_rank"],
        dmr=DMRSettings(**raw["dmr"]),
        pg=PGSettings(**raw["pg"]),
        tier_scale=raw["tier_scale"],
        balance_loss=raw["balance_loss"],
        expert_agg_exponent=raw["expert_agg_exponent"],
        self_pruning=SelfPruningSettings(**raw.get("self_pruning", {})),
        lora_scaling=raw["lora_scaling"],
        homogeneous_rank=raw["homogeneous_rank"],
        flora_init=raw["flora_init"],
        energy_threshold=float(raw["energy_threshold"]),
    )
