"""The run's config as Flower carries it: resolved YAML under one run-config key, node paths applied.

A simulation binds the YAML to its ClientApp; a deployment writes it into the TOML file
that ``flwr run --run-config`` reads, and both the deployed ServerApp and every ClientApp
read it back with :func:`config_from_run_config`. A SuperNode's ``--node-config`` may say
where its own copy of the data and cache live (``data-dir``, ``cache-dir``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

RUN_CONFIG_KEY = "ubsmoe-config"  # the run config entry holding the resolved Hydra config (YAML)
# paths resolved where the config is written: the ServerApp and ClientApps run in other directories
ABSOLUTE_KEYS = (
    "data.local_dir", "paths.cache_dir", "paths.root_dir", "paths.log_dir", "paths.output_dir",
    "backend.tls.ca_cert", "backend.tls.server_cert", "backend.tls.server_key", "backend.supernode_keys",
)  # fmt: skip
NODE_PATH_KEYS = {"data-dir": "data.local_dir", "cache-dir": "paths.cache_dir"}


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """The config with its data and cache paths absolute, so workers in other directories find them."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert isinstance(out, DictConfig)
    for key in ABSOLUTE_KEYS:
        value = OmegaConf.select(out, key)
        if value:
            OmegaConf.update(out, key, str(Path(str(value)).expanduser().resolve()))
    return out


def config_yaml_of(cfg: DictConfig) -> str:
    """The resolved config as the YAML text a ClientApp (or a deployed ServerApp) rebuilds it from."""
    return OmegaConf.to_yaml(absolute_paths(cfg))


def write_run_config(cfg: DictConfig, path: Path) -> Path:
    """A TOML file for ``flwr run --run-config``: the resolved config under ``ubsmoe-config``."""
    import tomli_w  # deferred: part of the optional Flower dependencies

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({RUN_CONFIG_KEY: config_yaml_of(cfg)}))
    return path


def config_from_run_config(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None, text: str | None = None
) -> DictConfig:
    """The run's config from the YAML ``text`` (a simulation's) or the run config, with this node's paths."""
    text = text if text is not None else str(run_config.get(RUN_CONFIG_KEY, ""))
    if not text:
        raise RuntimeError(
            f"the run config has no {RUN_CONFIG_KEY!r}: start the run with "
            "`flwr run flower-app <connection> --run-config <run dir>/flower_run_config.toml` (docs/flower.md)"
        )
    cfg = OmegaConf.create(text)
    assert isinstance(cfg, DictConfig)
    for node_key, cfg_key in NODE_PATH_KEYS.items():
        if node_config is not None and node_key in node_config:
            OmegaConf.update(cfg, cfg_key, str(node_config[node_key]))
    return cfg
