"""Entry point: ``python -m ubsmoe.train experiment=glue_hetero [key=value ...]`` (or ``python src/train.py``).

Composes the Hydra config from the repository's ``configs/`` (or the copy installed with
the package), checks group choices and unknown keys, validates every value, runs the
federated experiment and returns the metric a sweep optimises (the mean over tiers of the
task's main validation metric). Every user mistake ends with one line naming the key, the
value and what is allowed, and exit code 2 (``debug=true`` shows a traceback).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ubsmoe.errors import ConfigError
from ubsmoe.runner import run_experiment
from ubsmoe.schema import check_group_overrides, config_dir


def _fail(err: ConfigError, debug: bool) -> None:
    if debug:
        raise err
    print(f"Configuration error: {err}", file=sys.stderr)
    print("(run with debug=true for a traceback)", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        return run_experiment(cfg)
    except ConfigError as err:
        _fail(err, bool(cfg.get("debug")))
    return None


def main() -> float | None:
    """Check the group choices of the command line (Hydra's own error is a traceback), then run."""
    overrides = [a for a in sys.argv[1:] if not a.startswith("-")]
    try:
        check_group_overrides(overrides)
    except ConfigError as err:
        _fail(err, "debug=true" in overrides)
    return _hydra_main()


if __name__ == "__main__":
    main()
