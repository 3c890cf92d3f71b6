"""Validation of the composed Hydra config: every value a user may get wrong, checked before any work.

The one place that reads the raw config to check it. Each failure is one
:class:`~ubsmoe.errors.ConfigError` naming the key, the value and what is allowed. The
``method``, ``optim`` and ``server`` groups are checked from their settings dataclasses
(:mod:`ubsmoe.settings`: each field's type, interval or choices), so a new key is
declared once. Checks that need the data (a split missing from the local directory, more
clients than examples) or the backbone's config run in :mod:`ubsmoe.assembly`, also
before training starts.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ubsmoe import names
from ubsmoe.checks import get, optional, require_bool, require_choice, require_float, require_int
from ubsmoe.errors import ConfigError
from ubsmoe.fl.backends.flower_deploy import INSECURE_NOTE, TLS_KEYS, is_loopback, split_address
from ubsmoe.fl.backends.flower_env import require_flwr
from ubsmoe.fl.server_optim import check_server_optimizer
from ubsmoe.fl.strategies import STRATEGIES
from ubsmoe.privacy.dp import resolved_count_noise, resolved_noise_multiplier
from ubsmoe.schema import check_known_keys
from ubsmoe.settings import (
    MethodSettings,
    OptimSettings,
    PrivacySettings,
    ServerSettings,
    Tier,
    method_settings,
    model_settings,
    parse_tiers,
    privacy_settings,
    server_settings,
    settings_fields,
)
from ubsmoe.smoe.moefy import needs_calibration


def validate(cfg: DictConfig) -> list[Tier]:
    """Check every user-facing value of a composed config; return the parsed tiers.

    Unknown keys come first: a misspelled key would otherwise be ignored (or crash later).
    """
    check_known_keys(cfg)
    require_int(cfg, "seed", 0)
    require_bool(cfg, "debug")
    require_bool(cfg, "dry_run")
    _validate_method(cfg)
    kind = _validate_model(cfg)
    check_settings_group(cfg, "optim", OptimSettings)
    _validate_server(cfg)
    _validate_data(cfg, kind)
    steps = _validate_federation(cfg)
    _validate_privacy(cfg)
    _validate_run(cfg)

    tiers = parse_tiers(get(cfg, "tiers"))
    if OmegaConf.select(cfg, "federation.centralized", default=False) is not False:
        require_bool(cfg, "federation.centralized")
        tier_names = tuple(t.name for t in tiers)
        tier = OmegaConf.select(cfg, "federation.tier", default=None)
        if tier not in tier_names:
            raise ConfigError("federation.tier", tier, f"the tier a centralized run trains, one of {', '.join(tier_names)}")
        if steps is None:
            raise ConfigError("federation.local_steps", steps, "an integer: centralized runs match the local steps")
    return tiers


def check_settings_group(cfg: DictConfig, group: str, settings: type) -> None:
    """Check a config group against its settings dataclass: known keys, types, intervals, choices (nested too)."""
    raw = get(cfg, group)
    fields = settings_fields(settings, raw, group)
    hints = typing.get_type_hints(settings)
    for name, f in fields.items():
        if name not in raw:
            continue  # the field's default
        key, hint = f"{group}.{name}", hints[name]
        if dataclasses.is_dataclass(hint):
            check_settings_group(cfg, key, hint)
            continue
        value = get(cfg, key)
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            continue
        base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not tuple else hint
        if "choices" in f.metadata:
            require_choice(cfg, key, f.metadata["choices"])
        elif "range" in f.metadata:
            low, high, low_open, high_open = f.metadata["range"]
            if base is int:
                if low_open or high_open:
                    raise TypeError(f"{settings.__name__}.{name}: an integer range is closed")
                require_int(cfg, key, int(low), None if high is None else int(high))
            else:
                require_float(cfg, key, low, high, low_open=low_open, high_open=high_open)
        elif base is bool:
            require_bool(cfg, key)
        elif base is int:
            require_int(cfg, key, -(2**63))
        elif base is float:
            require_float(cfg, key)
        elif base is str and not isinstance(value, str):
            raise ConfigError(key, value, "a string")


def _validate_method(cfg: DictConfig) -> None:
    check_settings_group(cfg, "method", MethodSettings)
    phi_min, phi_max = float(get(cfg, "method.dmr.phi_min")), float(get(cfg, "method.dmr.phi_max"))
    if phi_min >= phi_max:
        raise ConfigError("method.dmr.phi_min", phi_min, f"a number below method.dmr.phi_max ({phi_max:g})")


def _validate_model(cfg: DictConfig) -> str:
    """The ``model`` group (its keys depend on the adapter); returns ``data.kind``."""
    adapter = optional(cfg, "model.adapter", "moefy")
    if adapter not in names.ADAPTERS:
        raise ConfigError("model.adapter", adapter, f"one of {', '.join(names.ADAPTERS)}")
    kind = optional(cfg, "data.kind", "glue")
    if kind not in names.DATA_KINDS:
        raise ConfigError("data.kind", kind, f"one of {', '.join(names.DATA_KINDS)}")
    if adapter == "moefy":
        num_experts = require_int(cfg, "model.num_experts", 1)
        if optional(cfg, "model.k_max", None) is not None:
            require_int(cfg, "model.k_max", 1, num_experts)
        _warn_candidates(cfg, num_experts)
        require_choice(cfg, "model.pooling", names.POOLINGS)
        require_choice(cfg, "model.router_init", names.ROUTER_INITS)
        if OmegaConf.select(cfg, "model.moefy") is not None:
            require_choice(cfg, "model.moefy.method", names.MOEFY_METHODS)
            require_bool(cfg, "model.moefy.skip_defaults")
            require_int(cfg, "model.moefy.calibration_examples", 1)
        if kind != "glue":
            raise ConfigError(
                "model.adapter", adapter, f"native for data.kind={kind} (a causal decoder; moefy cuts encoders)"
            )
    else:
        if optional(cfg, "model.num_experts", None) is not None:
            raise ConfigError(
                "model.num_experts", get(cfg, "model.num_experts"), "null for native backbones (E is the checkpoint's)"
            )
        if optional(cfg, "model.dtype", "float32") not in names.MODEL_DTYPES:
            raise ConfigError("model.dtype", get(cfg, "model.dtype"), f"one of {', '.join(names.MODEL_DTYPES)}")
        router_dtype = optional(cfg, "model.router_dtype", "float32")
        if router_dtype is not None and router_dtype not in names.MODEL_DTYPES:
            allowed = f"null (the weights' dtype) or one of {', '.join(names.MODEL_DTYPES)}"
            raise ConfigError("model.router_dtype", router_dtype, allowed)
        for key in ("model.pretrained", "model.gradient_checkpointing"):
            if not isinstance(optional(cfg, key, False), bool):
                raise ConfigError(key, get(cfg, key), "true or false")
        if kind == "glue":
            raise ConfigError(
                "model.adapter", adapter, "moefy for data.kind=glue (native backbones train instruction tasks)"
            )
    if optional(cfg, "model.k_max", None) is not None:
        require_int(cfg, "model.k_max", 1)  # the upper bound (M or E) is checked with the backbone's config
    if get(cfg, "model.dropout") is not None:
        require_float(cfg, "model.dropout", 0.0, 1.0, high_open=True)
    if not isinstance(get(cfg, "model.backbone"), str) or not get(cfg, "model.backbone"):
        raise ConfigError("model.backbone", get(cfg, "model.backbone"), "'minilm', a hub id or a local directory")
    require_int(cfg, "model.lora.rank", 1)
    require_float(cfg, "model.lora.alpha", 0.0, low_open=True)
    require_float(cfg, "model.lora.dropout", 0.0, 1.0, high_open=True)
    require_bool(cfg, "model.lora.ffn")
    if OmegaConf.select(cfg, "model.optim") is not None:  # a config written for the old layout
        raise ConfigError(
            "model.optim",
            OmegaConf.to_container(cfg.model.optim),
            "nothing: the keys moved to the optim group (optim.lr, ...)",
        )
    return str(kind)


def _validate_server(cfg: DictConfig) -> None:
    """The server update group ``server`` (configs/server/*.yaml), and whether the method can take it."""
    check_settings_group(cfg, "server", ServerSettings)
    optimizer = get(cfg, "server.optimizer")
    momentum = float(get(cfg, "server.momentum"))
    if momentum != 0.0 and optimizer != "fedavgm":
        raise ConfigError("server.momentum", momentum, "0 unless server.optimizer=fedavgm (the only one with momentum)")
    betas = get(cfg, "server.betas")
    if (
        not isinstance(betas, (list, ListConfig))
        or len(betas) != 2
        or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0 for b in betas)
    ):
        shown = list(betas) if isinstance(betas, ListConfig) else betas
        raise ConfigError("server.betas", shown, "two numbers [beta_1, beta_2], each in [0, 1)")
    initial_v = float(get(cfg, "server.initial_v"))
    if initial_v != 0.0 and optimizer in ("fedavg", "fedavgm"):
        raise ConfigError("server.initial_v", initial_v, "0 unless server.optimizer is fedadam, fedyogi or fedadagrad")
    method = method_settings(cfg)
    check_server_optimizer(server_settings(cfg), STRATEGIES[method.name], method_name=method.name)
    server = server_settings(cfg)
    if server.aggregator == "krum":
        f = server.krum_byzantine
        per_round = int(get(cfg, "federation.clients_per_round"))
        if 2 * f + 2 >= per_round:
            allowed = f"an f with 2 f + 2 < federation.clients_per_round ({per_round}): Krum needs n > 2 f + 2"
            raise ConfigError("server.krum_byzantine", f, allowed)
        select = server.krum_select
        if select is not None and select > per_round:
            raise ConfigError("server.krum_select", select, f"null or at most federation.clients_per_round ({per_round})")


def _validate_data(cfg: DictConfig, kind: str) -> None:
    require_int(cfg, "data.max_length", 8, 4096)
    require_int(cfg, "data.batch_size", 1)
    require_int(cfg, "data.eval_batch_size", 1)
    require_bool(cfg, "data.eval_sort_by_length")
    require_int(cfg, "data.train_length_window", 0)
    for key in ("data.max_train_examples", "data.max_eval_examples"):
        if get(cfg, key) is not None:
            require_int(cfg, key, 1)
    if kind == "glue":
        require_int(cfg, "data.regression_buckets", 2)
    else:
        _validate_commonsense(cfg)


def _validate_commonsense(cfg: DictConfig) -> None:
    """The ``data`` keys of ``data.kind: commonsense`` (configs/data/commonsense.yaml)."""
    benchmarks = list(names.BENCHMARKS)
    require_choice(cfg, "data.eval_mode", names.EVAL_MODES)
    require_int(cfg, "data.max_new_tokens", 1)
    require_int(cfg, "data.num_beams", 1)
    require_choice(cfg, "data.prompt_template", names.PROMPT_TEMPLATES)
    if not isinstance(get(cfg, "data.train_on_inputs"), bool):
        raise ConfigError("data.train_on_inputs", get(cfg, "data.train_on_inputs"), "true or false")
    require_choice(cfg, "data.partition_by", names.PARTITION_BY)
    source = get(cfg, "data.train_source")
    if not isinstance(source, str) or not source:
        raise ConfigError("data.train_source", source, "'local', a JSON path or URL, or a hub dataset id")
    if not isinstance(get(cfg, "data.likelihood_prefix"), str):
        raise ConfigError("data.likelihood_prefix", get(cfg, "data.likelihood_prefix"), "a string (may be empty)")
    for key, allow_empty in (("data.eval_benchmarks", False), ("data.train_benchmarks", True)):
        value = get(cfg, key)
        if not isinstance(value, (list, ListConfig)) or (not value and not allow_empty):
            allowed = f"a {'' if allow_empty else 'non-empty '}list of benchmarks among {benchmarks}"
            raise ConfigError(key, value, allowed)
        for name in value:
            if name not in benchmarks:
                raise ConfigError(key, name, f"benchmarks among {benchmarks}")
        if len(set(value)) != len(value):
            raise ConfigError(key, list(value), "each benchmark at most once")
    if get(cfg, "data.train_source") == "local" and not get(cfg, "data.train_benchmarks"):
        raise ConfigError("data.train_benchmarks", [], "at least one benchmark when data.train_source is 'local'")
    hub = get(cfg, "data.hub_test_files")
    if hub is not None and (
        not isinstance(hub, (dict, DictConfig))
        or any(k not in benchmarks or not isinstance(v, str) for k, v in hub.items())
    ):
        raise ConfigError(
            "data.hub_test_files", hub, f"a mapping benchmark -> path/URL/hub id, benchmarks among {benchmarks}"
        )


def _validate_federation(cfg: DictConfig) -> int | None:
    """The ``federation`` group; returns ``local_steps`` (None when the run counts epochs)."""
    num_clients = require_int(cfg, "federation.num_clients", 1)
    per_round = require_int(cfg, "federation.clients_per_round", 1)
    if per_round > num_clients:
        raise ConfigError(
            "federation.clients_per_round", per_round, f"at most federation.num_clients ({num_clients})"
        )
    require_int(cfg, "federation.rounds", 1)
    steps, epochs = get(cfg, "federation.local_steps"), get(cfg, "federation.local_epochs")
    if (steps is None) == (epochs is None):
        raise ConfigError(
            "federation.local_steps", steps, "exactly one of local_steps and local_epochs set (the other null)"
        )
    if steps is not None:
        require_int(cfg, "federation.local_steps", 1)
    else:
        require_int(cfg, "federation.local_epochs", 1)
    require_choice(cfg, "federation.partition", names.PARTITIONS)
    require_float(cfg, "federation.dirichlet_alpha", 0.0, low_open=True)
    require_int(cfg, "federation.min_client_size", 1)
    require_int(cfg, "federation.eval_every", 1)
    _validate_faults(cfg, per_round)
    require_float(cfg, "federation.prox_mu", 0.0)
    return steps


def _validate_faults(cfg: DictConfig, per_round: int) -> None:
    """``federation.{min_replies, max_update_norm, round_timeout}`` and ``federation.faults.*``."""
    require_int(cfg, "federation.min_replies", 1, per_round)
    for key in ("federation.max_update_norm", "federation.round_timeout"):
        if get(cfg, key) is not None:
            require_float(cfg, key, 0.0, low_open=True)
    faults = get(cfg, "federation.faults")
    allowed = {*names.FAULT_KINDS, "straggler_delay", "byzantine_mode", "byzantine_scale"}
    if not isinstance(faults, (dict, DictConfig)):
        raise ConfigError("federation.faults", faults, f"a mapping with the keys {sorted(allowed)}")
    unknown = sorted(set(faults.keys()) - allowed)
    if unknown:
        raise ConfigError(f"federation.faults.{unknown[0]}", faults[unknown[0]], f"a key among {sorted(allowed)}")
    total = sum(require_float(cfg, f"federation.faults.{kind}", 0.0, 1.0) for kind in names.FAULT_KINDS)
    if total > 1.0 + 1e-9:
        raise ConfigError(
            "federation.faults",
            {k: faults[k] for k in names.FAULT_KINDS},
            f"probabilities that sum to at most 1 (they sum to {total:g})",
        )
    require_float(cfg, "federation.faults.straggler_delay", 0.0)
    if "byzantine_mode" in faults:
        require_choice(cfg, "federation.faults.byzantine_mode", names.BYZANTINE_MODES)
    if "byzantine_scale" in faults:
        require_float(cfg, "federation.faults.byzantine_scale", 0.0)


def _validate_privacy(cfg: DictConfig) -> None:
    """The ``privacy`` group, and whether the method, aggregator and model can run under client-level DP."""
    if OmegaConf.select(cfg, "privacy") is None:
        return
    check_settings_group(cfg, "privacy", PrivacySettings)
    privacy = privacy_settings(cfg)
    if not privacy.enabled:
        return
    mode = f"privacy.dp={privacy.dp}"
    method = method_settings(cfg)
    if method.name not in names.DP_METHODS:
        raise ConfigError(
            "method.name",
            method.name,
            f"one of {', '.join(names.DP_METHODS)} under {mode}: the noise is calibrated to an average of the "
            "clients' states, and this method's server step is not one (docs/privacy.md)",
        )
    if method.tier_scale:
        raise ConfigError(
            "method.tier_scale",
            True,
            f"false under {mode}: each tier's scale is averaged over that tier's clients only, so one client moves "
            "it by clip / (its tier's clients), more than the noise covers",
        )
    aggregator = server_settings(cfg).aggregator
    if aggregator != "mean":
        raise ConfigError("server.aggregator", aggregator, f"mean under {mode}: the noise is calibrated to a mean")
    if privacy.target_epsilon is None and privacy.noise_multiplier is None:
        raise ConfigError("privacy.noise_multiplier", None, "a number >= 0, or set privacy.target_epsilon")
    if privacy.target_epsilon is not None and privacy.noise_multiplier is not None:
        raise ConfigError(
            "privacy.noise_multiplier", privacy.noise_multiplier, "null when privacy.target_epsilon sets it"
        )
    model = model_settings(cfg)
    calibrates = model.adapter == "moefy" and needs_calibration(
        model.moefy.method, model.router_init, model.moefy.skip_defaults
    )
    if method.sparse and calibrates and not privacy.public_calibration:
        raise ConfigError(
            "privacy.public_calibration",
            False,
            f"true under {mode} when model.moefy records calibration text (it is read from the clients' training "
            "data on the server), or a construction without data: model.moefy.method=weights "
            "model.router_init=centroid model.moefy.skip_defaults=false",
        )
    per_round = int(get(cfg, "federation.clients_per_round"))
    count_noise = resolved_count_noise(privacy, per_round)
    if count_noise is not None:
        z = resolved_noise_multiplier(
            privacy,
            num_clients=int(get(cfg, "federation.num_clients")),
            clients_per_round=per_round,
            rounds=int(get(cfg, "federation.rounds")),
        )
        if z > 0 and 2 * count_noise <= z:
            raise ConfigError(
                "privacy.count_noise",
                privacy.count_noise,
                f"a std above noise_multiplier / 2 = {z / 2:.4g} (null gives clients_per_round / 20 = {per_round / 20:g})",
            )


def _validate_run(cfg: DictConfig) -> None:
    """Logger, Fabric, backend, diagnostics, callbacks, checkpoints and ``resume``."""
    require_choice(cfg, "logger.name", names.LOGGERS)
    if get(cfg, "logger.name") == "wandb":
        require_choice(cfg, "logger.mode", names.WANDB_MODES)
    require_choice(cfg, "fabric.accelerator", names.ACCELERATORS)
    if str(get(cfg, "fabric.precision")) not in names.PRECISIONS:
        raise ConfigError("fabric.precision", get(cfg, "fabric.precision"), f"one of {', '.join(names.PRECISIONS)}")
    if require_choice(cfg, "backend.name", names.BACKENDS) == "flower":
        require_flwr()
        require_choice(cfg, "backend.mode", names.FLOWER_MODES)
        require_int(cfg, "backend.num_workers", 1)
        require_float(cfg, "backend.client_cpus", 0.0, low_open=True)
        require_float(cfg, "backend.client_gpus", 0.0)
        require_float(cfg, "backend.node_wait", 0.0)
        if get(cfg, "backend.mode") == "deployment":
            _validate_deployment(cfg)
    if OmegaConf.select(cfg, "diagnostics.every") is not None:
        require_int(cfg, "diagnostics.every", 1)
        require_int(cfg, "diagnostics.probe_examples", 1)
    for key in ("dmr", "expert_stats", "metrics_writer", "checkpoint"):
        require_bool(cfg, f"callbacks.{key}")
    require_int(cfg, "checkpoint.keep", 1)
    resume = get(cfg, "resume")
    if resume is not None and not isinstance(resume, bool) and not Path(str(resume)).exists():
        raise ConfigError("resume", resume, "null, true (latest checkpoint in the run directory) or an existing path")
    if resume is False:
        raise ConfigError("resume", resume, "null, true or a checkpoint path (false is spelled null)")


def _validate_deployment(cfg: DictConfig) -> None:
    """A deployment lets no one in: TLS files and SuperNode keys that exist, or insecure on loopback only."""
    address = get(cfg, "backend.superlink")
    try:
        split_address(str(address))
    except ValueError:
        raise ConfigError("backend.superlink", address, "host:port ([addr]:port for IPv6)") from None
    if require_bool(cfg, "backend.insecure"):
        if not is_loopback(str(address)):
            raise ConfigError(
                "backend.insecure", True, f"false with backend.superlink={address} (not loopback): {INSECURE_NOTE}"
            )
        return
    for key in (*(f"backend.tls.{k}" for k in TLS_KEYS), "backend.supernode_keys"):
        value = get(cfg, key)
        if value in (None, "") or not Path(str(value)).expanduser().exists():
            raise ConfigError(
                key, value, "an existing path (python -m ubsmoe.apps.certificates makes them; docs/flower.md)"
            )
    keys = Path(str(get(cfg, "backend.supernode_keys"))).expanduser()
    for cid in range(int(get(cfg, "federation.num_clients"))):
        if not (keys / f"client-{cid}.pub").is_file():
            raise ConfigError(
                "backend.supernode_keys", str(keys), f"a folder with every client's public key (client-{cid}.pub is missing)"
            )


def _warn_candidates(cfg: DictConfig, num_experts: int) -> None:
    """Warn when DMR's candidate set is every expert: then phi biases all of them, not a short list."""
    n_p = get(cfg, "method.dmr.num_candidates")
    if get(cfg, "method.sparse") and get(cfg, "method.dmr.enabled") and n_p is not None and n_p >= num_experts:
        warnings.warn(
            f"method.dmr.num_candidates={n_p} >= model.num_experts={num_experts}: every expert is a candidate, "
            "so phi biases all of them (the paper has N_p << M)",
            UserWarning,
            stacklevel=2,
        )


__all__ = ["check_settings_group", "validate"]
