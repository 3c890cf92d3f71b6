"""Build and run one federated experiment from a composed Hydra config.

Order matters for users: everything that can be checked without data or a model is
checked first (config values, task name, resume path and its compatibility), then the
data is loaded and partitioned (with its own checks), and only then the backbone is built
and training starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from ubsmoe.config import method_settings, model_settings, validate
from ubsmoe.data.datamodule import build_federated_data
from ubsmoe.data.glue import build_metrics, get_task, resolve_local_dir
from ubsmoe.data.report import partition_report
from ubsmoe.fl.backends import build_backend
from ubsmoe.fl.centralized import centralize
from ubsmoe.fl.checkpoint import check_fingerprint, load_checkpoint, resolve_resume
from ubsmoe.fl.client import make_client_specs, make_tier_specs
from ubsmoe.fl.loop import FederatedLoop
from ubsmoe.fl.server import ClientSampler
from ubsmoe.fl.strategies import StrategyContext, build_strategy
from ubsmoe.seeding import derive_seed

# Keys that may change when a run is resumed: how long it runs and where it writes.
RESUMABLE_KEYS = ("federation.rounds", "federation.eval_every")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


def run_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The flattened settings a resumed run must share with its checkpoint."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    keep = {k: raw[k] for k in ("seed", "model", "method", "federation", "tiers")}
    keep["data"] = {k: v for k, v in raw["data"].items() if k != "local_dir"}
    flat = _flatten("", keep, {})
    return {k: v for k, v in flat.items() if k not in RESUMABLE_KEYS}


def output_dir_of(cfg: DictConfig) -> Path:
    """The run directory: Hydra's job output directory (follows paths.output_dir; a sweep subdir under -m)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def build_loggers(cfg: DictConfig, output_dir: Path) -> list[Any]:
    """Fabric loggers for ``logger.name``: W&B (offline unless asked), or none (metrics files only)."""
    if cfg.logger.name != "wandb":
        return []
    from lightning.pytorch.loggers import WandbLogger

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


def build_callbacks(cfg: DictConfig, module: Any, output_dir: Path) -> list[Any]:
    from ubsmoe.callbacks.console import ConsoleTable
    from ubsmoe.callbacks.dmr import DMRCallback
    from ubsmoe.callbacks.expert_stats import ExpertStatsCallback
    from ubsmoe.callbacks.metrics_writer import MetricsWriter

    callbacks: list[Any] = []
    if cfg.callbacks.dmr:
        callbacks.append(DMRCallback(method_settings(cfg).dmr, module.phi_names()))
    diagnostics = cfg.get("diagnostics") or {}
    if diagnostics.get("every"):
        from ubsmoe.callbacks.grad_bias import GradBiasCallback

        # before the metrics writer: it adds fields to the round's records
        callbacks.append(GradBiasCallback(diagnostics["every"], diagnostics["probe_examples"]))
    if cfg.callbacks.metrics_writer:
        callbacks.append(MetricsWriter(output_dir, method=cfg.method.name, task=cfg.data.task, seed=cfg.seed))
    if cfg.callbacks.expert_stats:
        callbacks.append(ExpertStatsCallback())
    callbacks.append(ConsoleTable())
    return callbacks


def moefy_calibration(model_cfg: Any, method_cfg: Any, data: Any) -> list[dict[str, torch.Tensor]] | None:
    """Training batches for a data-driven MoEfication (``model.moefy``), or ``None`` when it needs none."""
    from ubsmoe.data.calibration import calibration_batches
    from ubsmoe.smoe.moefy import needs_calibration

    moefy_cfg = model_cfg.moefy
    if not method_cfg.sparse or not needs_calibration(moefy_cfg.method, model_cfg.router_init, moefy_cfg.skip_defaults):
        return None
    return calibration_batches(data.clients, moefy_cfg.calibration_examples)


def run_experiment(cfg: DictConfig) -> float | None:
    """Validate, build and run; return the mean over tiers of the task's main metric (last evaluation)."""
    console = Console()
    tiers = validate(cfg)
    cfg, tiers = centralize(cfg, tiers)
    task = get_task(cfg.data.task)
    model_cfg, method_cfg = model_settings(cfg), method_settings(cfg)
    output_dir = output_dir_of(cfg)
    resume_path = resolve_resume(cfg.resume, output_dir)
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    fingerprint = run_fingerprint(cfg)
    if checkpoint is not None:
        check_fingerprint(checkpoint["fingerprint"], fingerprint, resume_path)

    from ubsmoe.model import FederatedClassifier, check_model, resolve_backbone_path

    check_model(model_cfg, method_cfg, task.num_labels, len(tiers))
    backbone_path = resolve_backbone_path(model_cfg.backbone)
    data = build_federated_data(
        task=cfg.data.task,
        local_dir=cfg.data.local_dir,
        tokenizer_path=backbone_path,
        max_length=cfg.data.max_length,
        num_clients=cfg.federation.num_clients,
        partition=cfg.federation.partition,
        alpha=cfg.federation.dirichlet_alpha,
        min_client_size=cfg.federation.min_client_size,
        seed=cfg.seed,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        max_train_examples=cfg.data.max_train_examples,
        max_eval_examples=cfg.data.max_eval_examples,
        regression_buckets=cfg.data.regression_buckets,
        cache_dir=str(cfg.paths.cache_dir),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    console.rule(f"[bold]{cfg.run_name}[/bold] -> {output_dir}")
    console.print(OmegaConf.to_yaml(cfg, resolve=True))
    partition_report(data.label_counts, data.label_names, output_dir, console=console)
    if cfg.dry_run:
        return None

    import lightning as L

    if cfg.fabric.num_threads:
        torch.set_num_threads(int(cfg.fabric.num_threads))
    module = FederatedClassifier(
        model=model_cfg,
        method=method_cfg,
        num_labels=task.num_labels,
        metrics=build_metrics(task),
        num_tiers=len(tiers),
        init_seed=derive_seed(cfg.seed, "init"),
        calibration=moefy_calibration(model_cfg, method_cfg, data),
        cache_dir=str(cfg.paths.cache_dir),
    )
    callbacks = build_callbacks(cfg, module, output_dir)
    fabric = L.Fabric(
        accelerator=cfg.fabric.accelerator,
        devices=cfg.fabric.devices,
        precision=cfg.fabric.precision,
        loggers=build_loggers(cfg, output_dir),
        callbacks=callbacks,
    )
    fabric.setup_module(module)
    tier_specs = make_tier_specs(
        tiers,
        sparse=method_cfg.sparse,
        hetero_rank=method_cfg.hetero_rank,
        num_experts=model_cfg.num_experts,
        max_rank=model_cfg.lora.rank,
    )
    loop = FederatedLoop(
        fabric=fabric,
        module=module,
        data=data,
        specs=make_client_specs(cfg.federation.num_clients, tier_specs),
        tier_specs=tier_specs,
        strategy=build_strategy(
            method_cfg,
            StrategyContext(
                expert_tensor_names=module.expert_tensor_names(),
                lora_scaling=model_cfg.lora.alpha / model_cfg.lora.rank,
                seed=derive_seed(cfg.seed, "strategy"),
            ),
        ),
        sampler=ClientSampler(
            cfg.federation.num_clients, cfg.federation.clients_per_round, derive_seed(cfg.seed, "sampling")
        ),
        callbacks=callbacks,
        seed=cfg.seed,
        rounds=cfg.federation.rounds,
        local_steps=cfg.federation.local_steps,
        local_epochs=cfg.federation.local_epochs,
        eval_every=cfg.federation.eval_every,
        output_dir=output_dir,
        checkpoint=cfg.callbacks.checkpoint,
        fingerprint=fingerprint,
        backend=build_backend(**OmegaConf.to_container(cfg.backend, resolve=True)),
    )
    if checkpoint is not None:
        loop.load_state_dict(checkpoint)
        console.print(f"resumed from {resume_path} at round {loop.server.round}")
    evaluation = loop.run()
    for logger in fabric.loggers:
        logger.finalize("success")
    if not evaluation:
        return None
    return sum(e.main_metric for e in evaluation.values()) / len(evaluation)
