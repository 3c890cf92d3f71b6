"""Rebuild a finished run from its directory: config, data, module, strategy and final server state.

Export (:mod:`ubsmoe.export`) and the compute-shape sweep (:mod:`ubsmoe.shape_sweep`) both
start from what a run left behind (``.hydra/config.yaml`` and its last checkpoint), and
must rebuild the model exactly as the run built it: the same validation, the same
data-driven MoEfication (from the same training text or its cache), the same strategy state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ubsmoe.assembly import build_data, build_module, build_run_strategy, run_tier_specs
from ubsmoe.data.glue import get_task
from ubsmoe.errors import ConfigError
from ubsmoe.fl.centralized import centralize
from ubsmoe.fl.checkpoint import CHECKPOINT_FILE, load_checkpoint
from ubsmoe.fl.server import ServerState
from ubsmoe.seeding import derive_seed
from ubsmoe.validate import validate


# Keys added to the config after runs were made, with the value that rebuilds such a run as
# it ran (a saved config without the key is given this value, never the current default).
LATER_KEYS = {"data.eval_sort_by_length": False, "data.train_length_window": 0}


@dataclass
class FinishedRun:
    """A finished run's config, data, module, strategy and final server state, with its tiers."""

    cfg: DictConfig
    data: Any
    module: Any
    strategy: Any
    server: ServerState
    tier_specs: list[Any]
    task: Any
    init_seed: int


def load_finished_run(run_dir: str | Path) -> FinishedRun:
    """Rebuild ``run_dir``'s run at its last checkpoint (GLUE-kind runs); ConfigError when it is not one."""
    run_dir = Path(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise ConfigError("run_dir", str(run_dir), "a run directory with .hydra/config.yaml")
    cfg = OmegaConf.load(config_file)
    assert isinstance(cfg, DictConfig)
    for key, value in LATER_KEYS.items():
        if OmegaConf.select(cfg, key, default=None) is None:
            OmegaConf.update(cfg, key, value, force_add=True)
    checkpoint_path = run_dir / CHECKPOINT_FILE
    if not checkpoint_path.is_file():
        raise ConfigError("run_dir", str(run_dir), f"a run directory with a checkpoint ({CHECKPOINT_FILE})")
    if OmegaConf.select(cfg, "data.kind", default="glue") != "glue":
        raise ConfigError("run_dir", str(run_dir), "a GLUE-kind run (data.kind=glue or your own data): rebuilding "
                          "instruction-tuned decoders from a run directory is not built yet")  # fmt: skip
    # Built exactly as the run built it (a data-driven MoEfication reads the same training
    # text, or its cached result); a centralized run names only its own tier.
    cfg, tiers = centralize(cfg, validate(cfg))
    data = build_data(cfg, tiers)
    task = get_task(cfg.data.task)
    module = build_module(cfg, tiers, data)
    strategy = build_run_strategy(cfg, module)
    state = load_checkpoint(checkpoint_path)
    strategy.load_state_dict(state["strategy"])
    return FinishedRun(
        cfg=cfg,
        data=data,
        module=module,
        strategy=strategy,
        server=ServerState.from_state_dict(state["server"]),
        tier_specs=run_tier_specs(tiers, module),
        task=task,
        init_seed=derive_seed(cfg.seed, "init"),
    )
