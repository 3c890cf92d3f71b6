"""The deployed ServerApp: rebuild the run's config from the run config, run the project's runner on the Grid.

A deployment is started with ``flwr run`` against a SuperLink; the SuperLink starts the
ServerApp, which gets the resolved Hydra config through the run config key
``ubsmoe-config`` (written by ``python src/train.py ... backend=flower
backend.mode=deployment``) and calls :func:`ubsmoe.runner.run_experiment` with a
:class:`~ubsmoe.fl.backends.FlowerBackend` bound to its Grid: the same loop, callbacks,
metrics files and checkpoints as every other run.
"""

from __future__ import annotations

from ubsmoe.fl.backends.flower_env import prepare_flower_env

prepare_flower_env()

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ubsmoe.apps.flower_client import make_client_app  # noqa: E402
from ubsmoe.fl.backends import build_backend  # noqa: E402
from ubsmoe.fl.backends.flower_config import config_from_run_config  # noqa: E402
from ubsmoe.runner import run_experiment  # noqa: E402


def server_main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config on this Grid."""
    cfg = config_from_run_config(context.run_config)
    options = OmegaConf.to_container(cfg.backend, resolve=True)
    assert isinstance(options, dict)
    backend = build_backend(**options, grid=grid, client_app_factory=make_client_app)
    run_experiment(cfg, backend=backend)


def make_server_app() -> ServerApp:
    app = ServerApp()
    app.main()(server_main)
    return app
