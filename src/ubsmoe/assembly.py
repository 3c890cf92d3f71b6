"""The one place that wires a run together: data, model, strategy, tiers, callbacks and loggers.

The runner (and every Flower worker, and the export) builds a run through these functions
from a validated config, so all of them build the same thing. What differs between
``data.kind`` values (glue | commonsense) is which loader, tokenizer, backbone adapter and
task are put together: each kind is one :class:`RunKind` here and one entry of
:data:`RUN_KINDS`, so nothing above has a branch on the kind. Everything here may import
anything below it (fl, callbacks, model, data, backbones, tasks, settings); nothing below
imports this module.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ubsmoe import names
from ubsmoe.backbones import build_adapter
from ubsmoe.backbones.base import Calibration
from ubsmoe.backbones.native_adapter import load_tokenizer
from ubsmoe.callbacks.console_table import ConsoleTable
from ubsmoe.callbacks.dmr import DMRCallback
from ubsmoe.callbacks.expert_stats import ExpertStatsCallback
from ubsmoe.callbacks.grad_bias import GradBiasCallback
from ubsmoe.callbacks.metrics_writer import MetricsWriter
from ubsmoe.callbacks.privacy_report import PrivacyReport
from ubsmoe.data.calibration import calibration_batches
from ubsmoe.data.commonsense import BENCHMARKS, build_commonsense_data
from ubsmoe.data.datamodule import build_federated_data
from ubsmoe.data.glue import build_metrics, get_task
from ubsmoe.data.specs import LoaderSpec, PartitionSpec
from ubsmoe.data.user_task import prepare_user_data
from ubsmoe.fl.aggregation import ServerAggregation
from ubsmoe.fl.client import make_tier_specs
from ubsmoe.fl.faults import FaultInjection, FaultPolicy
from ubsmoe.fl.strategies import StrategyContext, build_strategy
from ubsmoe.model import FederatedClassifier, FederatedModel, check_model, resolve_backbone_path
from ubsmoe.privacy.dp import ClientLevelDP
from ubsmoe.run_console import RunConsole
from ubsmoe.seeding import derive_seed
from ubsmoe.settings import (
    MethodSettings,
    ModelSettings,
    Tier,
    method_settings,
    model_settings,
    optim_settings,
    privacy_settings,
    server_settings,
)
from ubsmoe.smoe.moefy import needs_calibration
from ubsmoe.tasks.instruction import InstructionTask


class RunKind(ABC):
    """Builds one kind of run's data and module from the composed config."""

    @abstractmethod
    def check(self, cfg: DictConfig, model: ModelSettings, method: MethodSettings, tiers: list[Tier]) -> None:
        """Checks that need the backbone's config but no weights and no data."""

    @abstractmethod
    def data(self, cfg: DictConfig, model: ModelSettings) -> Any:
        """The :class:`~ubsmoe.data.datamodule.FederatedData` of the run."""

    @abstractmethod
    def module(
        self, cfg: DictConfig, model: ModelSettings, method: MethodSettings, tiers: list[Tier], init_seed: int,
        data: Any,
    ) -> Any:  # fmt: skip
        """The LightningModule (one backbone adapter + one task); ``data`` is :meth:`data`'s result."""


class GlueKind(RunKind):
    """GLUE classification / regression on a moefy encoder (the framework's first setting).

    Also the user's own files (``data.custom``): they are checked, converted into the GLUE
    layout and registered as a task first, then everything runs as for a GLUE task.
    """

    def __init__(self) -> None:
        self.local_dir: str | None = None

    def check(self, cfg: DictConfig, model: ModelSettings, method: MethodSettings, tiers: list[Tier]) -> None:
        self.local_dir = cfg.data.local_dir
        if cfg.data.get("custom"):
            custom = OmegaConf.to_container(cfg.data.custom, resolve=True)
            assert isinstance(custom, dict)
            _, self.local_dir = prepare_user_data(cfg.data.task, custom, cfg.paths.cache_dir)
        check_model(model, method, get_task(cfg.data.task).num_labels, len(tiers))

    def data(self, cfg: DictConfig, model: ModelSettings) -> Any:
        return build_federated_data(
            task=cfg.data.task,
            local_dir=self.local_dir,
            tokenizer_path=resolve_backbone_path(model.backbone),
            max_length=cfg.data.max_length,
            regression_buckets=cfg.data.regression_buckets,
            partition=PartitionSpec.from_config(cfg),
            loader=LoaderSpec.from_config(cfg),
        )

    def module(
        self, cfg: DictConfig, model: ModelSettings, method: MethodSettings, tiers: list[Tier], init_seed: int,
        data: Any,
    ) -> Any:  # fmt: skip
        task = get_task(cfg.data.task)
        return FederatedClassifier(
            model=model,
            method=method,
            num_labels=task.num_labels,
            metrics=build_metrics(task),
            main_metric=task.main_metric,
            num_tiers=len(tiers),
            init_seed=init_seed,
            optim=optim_settings(cfg),
            calibration=moefy_calibration(cfg, model, method, data),
        )


def moefy_calibration(cfg: DictConfig, model: ModelSettings, method: MethodSettings, data: Any) -> Any:
    """The training text a data-driven MoEfication (``model.moefy``) records, or ``None`` when it reads none."""

    if not method.sparse or not needs_calibration(model.moefy.method, model.router_init, model.moefy.skip_defaults):
        return None
    batches = calibration_batches(data.clients, model.moefy.calibration_examples)
    return Calibration(batches=batches, cache_dir=str(cfg.paths.cache_dir))


class CommonsenseKind(RunKind):
    """Instruction tuning of a native sparse decoder on the commonsense mixture, scored per benchmark."""

    def __init__(self) -> None:
        self._tokenizer: Any = None

    def tokenizer(self, model: ModelSettings) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(model)
        return self._tokenizer

    def check(self, cfg: DictConfig, model: ModelSettings, method: MethodSettings, tiers: list[Tier]) -> None:
        build_adapter(model.adapter).check(model, method, InstructionTask.head)

    def data(self, cfg: DictConfig, model: ModelSettings) -> Any:
        d = cfg.data
        hub = OmegaConf.to_container(d.hub_test_files, resolve=True) if d.hub_test_files is not None else {}
        return build_commonsense_data(
            tokenizer=self.tokenizer(model),
            local_dir=d.local_dir,
            train_source=d.train_source,
            train_benchmarks=list(d.train_benchmarks),
            eval_benchmarks=list(d.eval_benchmarks),
            hub_test_files=dict(hub),  # type: ignore[arg-type]
            partition_by=d.partition_by,
            max_length=d.max_length,
            partition=PartitionSpec.from_config(cfg),
            loader=LoaderSpec.from_config(cfg),
            prompt_template=d.prompt_template,
            train_on_inputs=d.train_on_inputs,
        )

    def module(
        self, cfg: DictConfig, model: ModelSettings, method: MethodSettings, tiers: list[Tier], init_seed: int,
        data: Any,
    ) -> Any:  # fmt: skip
        benchmarks = list(cfg.data.eval_benchmarks)
        task = InstructionTask(
            tokenizer=self.tokenizer(model),
            answer_patterns={n: BENCHMARKS[n].pattern for n in benchmarks},
            answer_words={n: BENCHMARKS[n].answer_words for n in benchmarks},
            eval_mode=cfg.data.eval_mode,
            max_new_tokens=cfg.data.max_new_tokens,
            likelihood_prefix=cfg.data.likelihood_prefix,
            num_beams=cfg.data.num_beams,
        )
        return FederatedModel(
            adapter=build_adapter(model.adapter), task=task, model=model, method=method,
            num_tiers=len(tiers), init_seed=init_seed, optim=optim_settings(cfg),
        )  # fmt: skip


RUN_KINDS: dict[str, type[RunKind]] = {"glue": GlueKind, "commonsense": CommonsenseKind}
assert tuple(RUN_KINDS) == names.DATA_KINDS, "ubsmoe.names.DATA_KINDS and RUN_KINDS must list the same kinds"


def build_run_kind(cfg: DictConfig) -> RunKind:
    """The run kind of ``data.kind`` (validated by :func:`ubsmoe.validate.validate`; default glue)."""
    return RUN_KINDS[OmegaConf.select(cfg, "data.kind", default="glue")]()


def build_data(cfg: DictConfig, tiers: list[Tier]) -> Any:
    """The federated data of a run (checked, tokenized, partitioned): the runner's and every Flower worker's."""
    kind = build_run_kind(cfg)
    kind.check(cfg, model_settings(cfg), method_settings(cfg), tiers)
    return kind.data(cfg, model_settings(cfg))


def build_module(cfg: DictConfig, tiers: list[Tier], data: Any) -> Any:
    """The model of a run, initialised from ``derive_seed(seed, "init")``: equal in every process.

    ``data`` is the run's federated data (:func:`build_data`): a construction fitted to the
    task's text (``model.moefy``) reads its training examples, the same in every process.
    """
    kind = build_run_kind(cfg)
    return kind.module(cfg, model_settings(cfg), method_settings(cfg), tiers, derive_seed(cfg.seed, "init"), data)


def build_run_strategy(cfg: DictConfig, module: Any) -> Any:
    """The method's strategy for a run (the server's; a Flower worker uses its client-side hooks)."""
    model_cfg = module.model_settings
    return build_strategy(
        method_settings(cfg),
        StrategyContext(
            expert_tensor_names=module.expert_tensor_names(),
            lora_scaling=model_cfg.lora.alpha / model_cfg.lora.rank,
            seed=derive_seed(cfg.seed, "strategy"),
        ),
    )


def run_tier_specs(tiers: list[Tier], module: Any) -> list[Any]:
    """Each tier's K_c or r_c for this module and method (the runner's and the export's one definition)."""
    method = module.method
    return make_tier_specs(
        tiers,
        sparse=method.sparse,
        hetero_rank=method.hetero_rank,
        num_experts=module.model_settings.num_experts,  # M for moefy, the checkpoint's E for native
        max_rank=module.model_settings.lora.rank,
        k_max=module.k_max,  # K_c = floor(K_max * beta): model.k_max, else M (moefy) or the model's top-k (native)
        homogeneous_rank=method.homogeneous_rank,
    )


def fault_policy(cfg: DictConfig) -> FaultPolicy:
    """The validated fault settings of ``federation`` as a :class:`~ubsmoe.fl.faults.FaultPolicy`."""
    fed = cfg.federation
    injection = FaultInjection(
        **{kind: float(fed.faults[kind]) for kind in names.FAULT_KINDS},
        straggler_delay=float(fed.faults.straggler_delay),
        byzantine_mode=str(fed.faults.byzantine_mode),
        byzantine_scale=float(fed.faults.byzantine_scale),
    )
    return FaultPolicy(
        injection=injection,
        min_replies=int(fed.min_replies),
        max_update_norm=None if fed.max_update_norm is None else float(fed.max_update_norm),
        round_timeout=None if fed.round_timeout is None else float(fed.round_timeout),
    )


def build_aggregation(cfg: DictConfig) -> ServerAggregation:
    """The server's aggregation rule (``server.aggregator``) and client-level DP mechanism (``privacy``)."""
    server, privacy = server_settings(cfg), privacy_settings(cfg)
    dp = None
    if privacy.enabled:
        dp = ClientLevelDP(
            privacy,
            num_clients=int(cfg.federation.num_clients),
            clients_per_round=int(cfg.federation.clients_per_round),
            rounds=int(cfg.federation.rounds),
            seed=derive_seed(cfg.seed, "privacy"),
        )
    return ServerAggregation(
        aggregator=server.aggregator,
        trim_fraction=server.trim_fraction,
        krum_byzantine=server.krum_byzantine,
        krum_select=server.krum_select,
        dp=dp,
    )


def build_callbacks(
    cfg: DictConfig, module: Any, output_dir: Path, console: RunConsole, aggregation: ServerAggregation | None = None
) -> list[Any]:
    """The run's Fabric callbacks, in the order they must run at the end of a round.

    With client-level DP, ``aggregation``'s mechanism is reported (and checkpointed) by a
    :class:`PrivacyReport` that runs before the metrics writer.
    """
    callbacks: list[Any] = []
    if cfg.callbacks.dmr:
        callbacks.append(DMRCallback(method_settings(cfg).dmr, module.phi_names()))
    diagnostics = cfg.get("diagnostics") or {}
    if diagnostics.get("every"):
        # before the metrics writer: it adds fields to the round's records
        callbacks.append(GradBiasCallback(diagnostics["every"], diagnostics["probe_examples"]))
    if aggregation is not None and aggregation.dp is not None:
        callbacks.append(PrivacyReport(aggregation.dp, console))  # before the metrics writer: adds epsilon
    if cfg.callbacks.metrics_writer:
        callbacks.append(MetricsWriter(output_dir, method=cfg.method.name, task=cfg.data.task, seed=cfg.seed))
    if cfg.callbacks.expert_stats:
        callbacks.append(ExpertStatsCallback())
    callbacks.append(ConsoleTable(console))
    return callbacks


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Any]:
    """Fabric loggers for ``logger.name``: W&B (offline unless asked), or none (metrics files only)."""
    if cfg.logger.name != "wandb":
        return []
    from lightning.pytorch.loggers import WandbLogger  # deferred: imports wandb, a heavy optional dependency

    mode = os.environ.get("WANDB_MODE") or cfg.logger.mode
    logger = WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        name=f"{cfg.run_name}-seed{cfg.seed}",
        save_dir=str(output_dir),
        tags=list(cfg.logger.tags),
        mode=mode,
    )
    # Under "cfg": a W&B sweep sets (and locks) top-level keys such as `method` itself.
    logger.log_hyperparams({"cfg": OmegaConf.to_container(cfg, resolve=True)})
    return [logger]
