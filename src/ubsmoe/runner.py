"""Build and run one federated experiment from a composed Hydra config.

Order matters for users: everything that can be checked without data or a model is
checked first (config values, task name, resume path and its compatibility), then the
data is loaded and partitioned (with its own checks), and only then the backbone is built
and training starts.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ubsmoe.assembly import (
    build_aggregation,
    build_callbacks,
    build_loggers,
    build_module,
    build_run_kind,
    build_run_strategy,
    fault_policy,
    run_tier_specs,
)
from ubsmoe.data.report import partition_report
from ubsmoe.fl.backends import ClientBackend, FlowerBackend, build_backend
from ubsmoe.fl.centralized import centralize
from ubsmoe.fl.checkpoint import (
    RunInterrupted,
    check_fingerprint,
    load_checkpoint,
    print_interrupted,
    resolve_resume,
)
from ubsmoe.fl.client import make_client_specs
from ubsmoe.fl.devices import server_device
from ubsmoe.fl.loop import FederatedLoop
from ubsmoe.fl.schedule import NEEDS_TOTAL_ROUNDS
from ubsmoe.fl.server import ClientSampler
from ubsmoe.fl.server_optim import build_server_optimizer
from ubsmoe.run_console import RunConsole
from ubsmoe.schema import flatten
from ubsmoe.seeding import derive_seed
from ubsmoe.settings import method_settings, model_settings, server_settings
from ubsmoe.validate import validate

# Keys that may change when a run is resumed: how long it runs, where it writes, where the server state lives.
RESUMABLE_KEYS = ("federation.rounds", "federation.eval_every", "server.device")


def run_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The flattened settings a resumed run must share with its checkpoint."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    groups = ("seed", "model", "method", "federation", "tiers", "optim", "server", "privacy")
    keep = {k: raw[k] for k in groups if k in raw}
    keep["data"] = {k: v for k, v in raw["data"].items() if k != "local_dir"}
    flat = flatten(keep)
    resumable = set(RESUMABLE_KEYS)
    if raw["optim"]["schedule"] in NEEDS_TOTAL_ROUNDS:  # the remaining rounds' rates depend on the total
        resumable.discard("federation.rounds")
    return {k: v for k, v in flat.items() if k not in resumable}


def output_dir_of(cfg: DictConfig) -> Path:
    """The run directory: Hydra's job output directory (follows paths.output_dir; a sweep subdir under -m)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def resume_command(output_dir: Path, checkpoint: Path | None = None) -> str:
    """The exact command that continues this run: its own overrides, its run directory, ``resume=true``.

    ``resume=<checkpoint>`` instead when the last checkpoint lives elsewhere (a run resumed
    from another directory and stopped before writing its own first checkpoint).
    """
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        overrides = [
            o for o in HydraConfig.get().overrides.task
            if o.split("=", 1)[0].lstrip("+~") not in ("resume", "paths.output_dir")
        ]  # fmt: skip
        script = str(Path(sys.argv[0]).resolve()) if sys.argv and sys.argv[0].endswith(".py") else "src/train.py"
    else:  # called from Python: the caller's overrides are not known
        overrides, script = ["<the run's other overrides>"], "src/train.py"
    elsewhere = checkpoint is not None and Path(checkpoint).resolve().parent != (output_dir / "checkpoints").resolve()
    resume = f"resume={checkpoint}" if elsewhere else "resume=true"
    return shlex.join([sys.executable, script, *overrides, f"paths.output_dir={output_dir}", resume])


def record_overrides(output_dir: Path) -> None:
    """Append this invocation's command-line overrides to ``overrides_history.jsonl``.

    Hydra rewrites ``.hydra/overrides.yaml`` on every start, so a resumed run would lose
    what the first run was started with; the history keeps every start, in order.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "overrides": list(HydraConfig.get().overrides.task)}
    with (output_dir / "overrides_history.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def run_experiment(cfg: DictConfig, backend: ClientBackend | None = None) -> float | None:
    """Validate, build and run; return the mean over tiers of the task's main metric (last evaluation).

    ``backend`` is the one a host already built (a Flower ServerApp hands in its Grid's);
    by default the ``backend`` group's. The backend's :meth:`~ClientBackend.launch` hosts
    the training: the local backend runs it here, the Flower backend inside a ServerApp.
    """
    console = RunConsole()
    tiers = validate(cfg)
    cfg, tiers = centralize(cfg, tiers)
    kind = build_run_kind(cfg)
    model_cfg, method_cfg = model_settings(cfg), method_settings(cfg)
    output_dir = output_dir_of(cfg)
    resume_path = resolve_resume(cfg.resume, output_dir, warn=lambda msg: console.print(f"[yellow]{msg}[/yellow]"))
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    fingerprint = run_fingerprint(cfg)
    if checkpoint is not None:
        check_fingerprint(checkpoint["fingerprint"], fingerprint, resume_path)

    kind.check(cfg, model_cfg, method_cfg, tiers)
    if backend is None:
        backend = build_backend(**OmegaConf.to_container(cfg.backend, resolve=True))
    if isinstance(backend, FlowerBackend) and backend.client_app_factory is None:
        # deferred: the ClientApp imports Flower, an optional dependency of backend=flower only
        from ubsmoe.apps.flower_client import make_client_app

        backend.client_app_factory = make_client_app
    data_start = time.perf_counter()
    data = kind.data(cfg, model_cfg)
    data_seconds = time.perf_counter() - data_start
    output_dir.mkdir(parents=True, exist_ok=True)
    console.log_to(output_dir / "train.log")
    record_overrides(output_dir)
    console.rule(f"[bold]{cfg.run_name}[/bold] -> {output_dir}")
    console.print(OmegaConf.to_yaml(cfg, resolve=True))
    partition_report(data.label_counts, data.label_names, output_dir, console=console)
    if cfg.dry_run:
        return None
    run_backend = backend
    return run_backend.launch(
        cfg,
        lambda: _train(
            cfg, tiers, data, output_dir, fingerprint, checkpoint, resume_path, run_backend, console, data_seconds
        ),
    )


def _train(
    cfg: DictConfig,
    tiers: list[Any],
    data: Any,
    output_dir: Path,
    fingerprint: dict[str, Any],
    checkpoint: dict[str, Any] | None,
    resume_path: Path | None,
    backend: ClientBackend,
    console: RunConsole,
    data_seconds: float,
) -> float | None:
    """Build the module, Fabric and loop, and run the rounds (inside the backend's host).

    What building costs (the data, the model with its MoEfication, the rest) goes into the
    first timing record this process writes.
    """
    import lightning as L

    model_cfg, method_cfg = model_settings(cfg), method_settings(cfg)
    if cfg.fabric.num_threads:
        torch.set_num_threads(int(cfg.fabric.num_threads))
    module_start = time.perf_counter()
    module = build_module(cfg, tiers, data)
    module_seconds = time.perf_counter() - module_start
    aggregation = build_aggregation(cfg)
    callbacks = build_callbacks(cfg, module, output_dir, console, aggregation)
    fabric = L.Fabric(
        accelerator=cfg.fabric.accelerator,
        devices=cfg.fabric.devices,
        precision=cfg.fabric.precision,
        loggers=build_loggers(cfg, output_dir),
        callbacks=callbacks,
    )
    fabric.setup_module(module)
    tier_specs = run_tier_specs(tiers, module)
    strategy = build_run_strategy(cfg, module)
    loop = FederatedLoop(
        fabric=fabric,
        module=module,
        data=data,
        specs=make_client_specs(cfg.federation.num_clients, tier_specs),
        tier_specs=tier_specs,
        strategy=strategy,
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
        backend=backend,
        faults=fault_policy(cfg),
        checkpoint_keep=cfg.checkpoint.keep,
        # DMR's phi keeps its own server update; PG defaults live outside the global state.
        server_optimizer=build_server_optimizer(
            server_settings(cfg), strategy, frozen_names=module.phi_names(), method_name=cfg.method.name
        ),
        prox_mu=float(cfg.federation.prox_mu),
        server_device=server_device(server_settings(cfg).device),
        aggregation=aggregation,
        setup_seconds={
            "data": data_seconds,
            "model": module_seconds,
            "engine": time.perf_counter() - module_start - module_seconds,
        },
    )
    if checkpoint is not None:
        loop.load_state_dict(checkpoint)
        loop.last_checkpoint = resume_path
        console.print(f"resumed from {resume_path} at round {loop.server.round}")
    try:
        evaluation = loop.run()
    except RunInterrupted as err:
        print_interrupted(err, loop.last_checkpoint, resume_command(output_dir, loop.last_checkpoint))
        raise SystemExit(128 + err.signum) from None
    for logger in fabric.loggers:
        logger.finalize("success")
    console.rule(f"[bold]{cfg.run_name}[/bold] done: {output_dir}")
    if not evaluation:
        return None
    return sum(e.main_metric for e in evaluation.values()) / len(evaluation)
