"""Run kinds: how the runner builds the data and the module for ``data.kind`` (glue | commonsense).

The runner's order (config checks, then data, then the model) is the same for every kind; what
differs is which loader, tokenizer, backbone adapter and task are put together. Each kind is one
class here and one entry of :data:`RUN_KINDS`, so the runner has no branch on the kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ubsmoe.config import Tier, optim_settings
from ubsmoe.settings import MethodSettings, ModelSettings


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
        from ubsmoe.data.glue import get_task
        from ubsmoe.model import check_model

        self.local_dir = cfg.data.local_dir
        if cfg.data.get("custom"):
            from ubsmoe.data.user_task import prepare_user_data

            custom = OmegaConf.to_container(cfg.data.custom, resolve=True)
            assert isinstance(custom, dict)
            _, self.local_dir = prepare_user_data(cfg.data.task, custom, cfg.paths.cache_dir)
        check_model(model, method, get_task(cfg.data.task).num_labels, len(tiers))

    def data(self, cfg: DictConfig, model: ModelSettings) -> Any:
        from ubsmoe.data.datamodule import build_federated_data
        from ubsmoe.data.specs import LoaderSpec, PartitionSpec
        from ubsmoe.model import resolve_backbone_path

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
        from ubsmoe.data.glue import build_metrics, get_task
        from ubsmoe.model import FederatedClassifier

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
    from ubsmoe.backbones.base import Calibration
    from ubsmoe.data.calibration import calibration_batches
    from ubsmoe.smoe.moefy import needs_calibration

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
            from ubsmoe.backbones.native_adapter import load_tokenizer

            self._tokenizer = load_tokenizer(model)
        return self._tokenizer

    def check(self, cfg: DictConfig, model: ModelSettings, method: MethodSettings, tiers: list[Tier]) -> None:
        from ubsmoe.backbones import build_adapter
        from ubsmoe.tasks.instruction import InstructionTask

        build_adapter(model.adapter).check(model, method, InstructionTask.head)

    def data(self, cfg: DictConfig, model: ModelSettings) -> Any:
        from ubsmoe.data.commonsense import build_commonsense_data
        from ubsmoe.data.specs import LoaderSpec, PartitionSpec

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
        )

    def module(
        self, cfg: DictConfig, model: ModelSettings, method: MethodSettings, tiers: list[Tier], init_seed: int,
        data: Any,
    ) -> Any:  # fmt: skip
        from ubsmoe.backbones import build_adapter
        from ubsmoe.data.commonsense import BENCHMARKS
        from ubsmoe.model import FederatedModel
        from ubsmoe.tasks.instruction import InstructionTask

        names = list(cfg.data.eval_benchmarks)
        task = InstructionTask(
            tokenizer=self.tokenizer(model),
            answer_patterns={n: BENCHMARKS[n].pattern for n in names},
            answer_words={n: BENCHMARKS[n].answer_words for n in names},
            eval_mode=cfg.data.eval_mode,
            max_new_tokens=cfg.data.max_new_tokens,
            likelihood_prefix=cfg.data.likelihood_prefix,
        )
        return FederatedModel(
            adapter=build_adapter(model.adapter), task=task, model=model, method=method,
            num_tiers=len(tiers), init_seed=init_seed, optim=optim_settings(cfg),
        )  # fmt: skip


RUN_KINDS = {"glue": GlueKind, "commonsense": CommonsenseKind}


def build_run_kind(cfg: DictConfig) -> RunKind:
    """The run kind of ``data.kind`` (validated by :func:`ubsmoe.config.validate`; default glue)."""
    return RUN_KINDS[OmegaConf.select(cfg, "data.kind", default="glue")]()
