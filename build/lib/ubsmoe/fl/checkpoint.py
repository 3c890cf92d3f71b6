"""Atomic full-state checkpoints and their resolution for ``resume=``.

A checkpoint holds everything a run needs to continue exactly: the server state (global
trainable tensors, phi, PG defaults, utilization), the round, the sampler's generator,
the torch / numpy / python RNG states, the strategy's and callbacks' state, and the
run fingerprint (the config keys that must not change across a resume).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ubsmoe.errors import ConfigError

if TYPE_CHECKING:
    from lightning.fabric import Fabric

CHECKPOINT_FILE = Path("checkpoints") / "last.ckpt"
FORMAT = "ubsmoe-checkpoint-v1"


def save_checkpoint(fabric: Fabric, path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, {"format": FORMAT, **state})
    os.replace(tmp, path)


def resolve_resume(resume: Any, output_dir: Path) -> Path | None:
    """The checkpoint file ``resume`` names: null, true (this run directory) or a file / run directory."""
    if resume is None:
        return None
    if resume is True:
        path = output_dir / CHECKPOINT_FILE
        if not path.is_file():
            raise ConfigError(
                "resume",
                True,
                f"a run directory with a checkpoint; {path} does not exist "
                "(pass paths.output_dir=RUN_DIR of the run to continue, or resume=PATH)",
            )
        return path
    path = Path(str(resume))
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError("resume", resume, f"an existing checkpoint file or run directory ({path} not found)")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, or fail with a ConfigError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError("resume", str(path), f"a readable UB-SMoE checkpoint (reading it failed: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError("resume", str(path), f"a UB-SMoE checkpoint of format {FORMAT}")
    return state


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """A resumed run must keep every setting that shapes the run so far; name the first that differs."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise ConfigError(
                key,
                current.get(key),
                f"the value the checkpoint {path} was written with ({saved.get(key)!r}) to resume it",
            )
