"""Validation of the composed Hydra config, and its conversion into typed settings.

Every value a user may get wrong is checked here, before any data is loaded or any model
built, and each failure is one :class:`~ubsmoe.errors.ConfigError` naming the key, the
value, and what is allowed. Checks that need the data (a split missing from the local
directory, more clients than examples) live next to the data code and also run before
training starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
)

LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("offline", "online", "disabled")
POOLINGS = ("mean", "cls")
ROUTER_INITS = ("centroid", "zeros", "fitted")
MOEFY_METHODS = ("weights", "coactivation")
PARTITIONS = ("dirichlet", "iid")
ACCELERATORS = ("cpu", "cuda", "mps", "auto")


@dataclass(frozen=True)
class Tier:
    """A compute tier: clients with budget ``beta`` make up ``share`` of the federation."""

    name: str
    beta: float
    share: float

    def num_experts_active(self, num_experts: int) -> int:
        """K_c = max(1, floor(M * beta))."""
        return max(1, math.floor(num_experts * self.beta + 1e-9))

    def lora_rank(self, max_rank: int) -> int:
        """r_c = max(1, floor(r * beta))."""
        return max(1, math.floor(max_rank * self.beta + 1e-9))


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
    """Check every user-facing value of a composed config; return the parsed tiers."""
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
    _require_float(cfg, "method.dmr.zeta", 0.0, 1.0)
    phi_min = _require_float(cfg, "method.dmr.phi_min")
    phi_max = _require_float(cfg, "method.dmr.phi_max")
    if phi_min >= phi_max:
        raise ConfigError("method.dmr.phi_min", phi_min, f"a number below method.dmr.phi_max ({phi_max:g})")
    _require_float(cfg, "method.dmr.penalty", 0.0)
    _require_float(cfg, "method.dmr.eps", 0.0, low_open=True)
    _require_bool(cfg, "method.pg.router")
    _require_bool(cfg, "method.pg.expert")
    _require_float(cfg, "method.pg.eta", 0.0)
    _require_float(cfg, "method.pg.default_momentum", 0.0, 1.0, high_open=True)
    _require_bool(cfg, "method.tier_scale")
    _require_float(cfg, "method.balance_loss", 0.0)
    _require_float(cfg, "method.expert_agg_exponent", 0.0)
    if OmegaConf.select(cfg, "method.self_pruning.gamma") is not None:
        _require_float(cfg, "method.self_pruning.gamma", 0.0, 1.0, low_open=True)
        _require_float(cfg, "method.self_pruning.strength", 0.0)

    _require_int(cfg, "model.num_experts", 1)
    _require_choice(cfg, "model.pooling", POOLINGS)
    _require_choice(cfg, "model.router_init", ROUTER_INITS)
    if OmegaConf.select(cfg, "model.moefy") is not None:
        _require_choice(cfg, "model.moefy.method", MOEFY_METHODS)
        _require_bool(cfg, "model.moefy.skip_defaults")
        _require_int(cfg, "model.moefy.calibration_examples", 1)
    if _get(cfg, "model.dropout") is not None:
        _require_float(cfg, "model.dropout", 0.0, 1.0, high_open=True)
    if not isinstance(_get(cfg, "model.backbone"), str) or not _get(cfg, "model.backbone"):
        raise ConfigError("model.backbone", _get(cfg, "model.backbone"), "'minilm', a hub id or a local directory")
    _require_int(cfg, "model.lora.rank", 1)
    _require_float(cfg, "model.lora.alpha", 0.0, low_open=True)
    _require_float(cfg, "model.lora.dropout", 0.0, 1.0, high_open=True)
    _require_bool(cfg, "model.lora.ffn")
    for key in ("lr", "head_lr", "router_lr", "phi_lr"):
        _require_float(cfg, f"model.optim.{key}", 0.0, low_open=True)
    _require_float(cfg, "model.optim.weight_decay", 0.0)

    _require_int(cfg, "data.max_length", 8, 4096)
    _require_int(cfg, "data.batch_size", 1)
    _require_int(cfg, "data.eval_batch_size", 1)
    for key in ("data.max_train_examples", "data.max_eval_examples"):
        if _get(cfg, key) is not None:
            _require_int(cfg, key, 1)
    _require_int(cfg, "data.regression_buckets", 2)

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

    _require_choice(cfg, "logger.name", LOGGERS)
    if _get(cfg, "logger.name") == "wandb":
        _require_choice(cfg, "logger.mode", WANDB_MODES)
    _require_choice(cfg, "fabric.accelerator", ACCELERATORS)
    from ubsmoe.fl.backends import BACKENDS

    _require_choice(cfg, "backend.name", tuple(BACKENDS))
    if OmegaConf.select(cfg, "diagnostics.every") is not None:
        _require_int(cfg, "diagnostics.every", 1)
        _require_int(cfg, "diagnostics.probe_examples", 1)
    for key in ("dmr", "expert_stats", "metrics_writer", "checkpoint"):
        _require_bool(cfg, f"callbacks.{key}")

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


def model_settings(cfg: DictConfig) -> ModelSettings:
    """The validated ``model`` group as :class:`ModelSettings`."""
    raw = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(raw, dict)
    return ModelSettings(
        name=raw["name"],
        backbone=raw["backbone"],
        pooling=raw["pooling"],
        num_experts=raw["num_experts"],
        router_init=raw["router_init"],
        dropout=raw.get("dropout"),
        lora=LoraSettings(**raw["lora"]),
        optim=OptimSettings(**raw["optim"]),
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
    )
