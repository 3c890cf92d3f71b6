"""The deployed ServerApp: rebuild the run's config from the run config, run the project's runner on the Grid.

A deployment is started with ``flwr run`` against a SuperLink; the SuperLink starts the
ServerApp, which gets the resolved Hydra config through the run config key
``ubsmoe-config`` (written by :func:`write_run_config`, i.e. by
``python src/train.py ... backend=flower backend.mode=deployment``) and calls
:func:`ubsmoe.runner.run_experiment` with a :class:`FlowerBackend` bound to its Grid:
the same loop, callbacks, metrics files and checkpoints as every other run.
"""

from __future__ import annotations

from pathlib import Path
from ubsmoe.fl.backends.flower_env import prepare_flower_env

prepare_flower_env()

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from ubsmoe.fl.backends.flower_client import RUN_CONFIG_KEY, config_yaml_of  # noqa: E402


def write_run_config(cfg: DictConfig, path: Path) -> Path:
    """A TOML file for ``flwr run --run-config``: the resolved config under ``ubsmoe-config``."""
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({RUN_CONFIG_KEY: config_yaml_of(cfg)}))
    return path


def config_from_context(context: Context) -> DictConfig:
    text = str(context.run_config.get(RUN_CONFIG_KEY, ""))
    if not text:
        raise RuntimeError(
            f"the run config has no {RUN_CONFIG_KEY!r}: start the run with "
            "`flwr run flower-app <connection> --run-config <run dir>/flower_run_config.toml` (docs/flower.md)"
        )
    cfg = OmegaConf.create(text)
    assert isinstance(cfg, DictConfig)
    return cfg


def server_main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config on this Grid."""
    from ubsmoe.fl.backends import build_backend
    from ubsmoe.runner import run_experiment

    cfg = config_from_context(context)
    options = OmegaConf.to_container(cfg.backend, resolve=True)
    assert isinstance(options, dict)
    backend = build_backend(**options)
    backend.grid = grid  # type: ignore[attr-defined]
    run_experiment(cfg, backend=backend)


def make_server_app() -> ServerApp:
    app = ServerApp()
    app.main()(server_main)
    return app
