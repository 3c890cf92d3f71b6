"""Entry point: ``python src/train.py experiment=glue_hetero [key=value ...]``.

Composes the Hydra config, validates it, runs the federated experiment and returns the
metric a sweep optimises (the mean over tiers of the task's main validation metric).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ubsmoe.errors import ConfigError
from ubsmoe.runner import run_experiment


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return run_experiment(cfg)
    except ConfigError as err:
        if cfg.get("debug"):
            raise
        print(f"Configuration error: {err}", file=sys.stderr)
        print("(run with debug=true for a traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
