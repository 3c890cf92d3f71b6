"""Process hygiene before Flower (and Ray) are imported: no telemetry, no update checks, loopback.

Flower and Ray phone home by default (usage telemetry, update checks), keep state under
``~/.flwr`` and, in a deployment, run ``uv sync`` on the SuperLink to install an app's
dependencies (which would pull a multi-GB CUDA torch). This module turns all of that off
unless the user set the variable themselves, and is the one place that imports ``flwr``
for the first time, so the settings are in place when Flower reads them.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from ubsmoe.errors import ConfigError

EXTRA_HINT = "the Flower extra installed: pip install -e '.[flower]' (flwr[simulation]==1.42.0)"

# Set unless the user already chose (opting in to telemetry is the user's call, not ours).
QUIET_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray on Linux binds its node to 127.0.0.1 instead of the machine's outward address.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "RAY_DEDUP_LOGS": "0",
}


def flwr_available() -> bool:
    """Whether the optional ``flower`` extra is importable (without importing it)."""
    return importlib.util.find_spec("flwr") is not None


def require_flwr() -> None:
    """A :class:`ConfigError` naming the extra when ``backend=flower`` is asked for without it."""
    if not flwr_available():
        raise ConfigError("backend.name", "flower", EXTRA_HINT)


def prepare_flower_env(home: Path | str | None = None) -> Path:
    """Quiet, loopback-only defaults and a ``FLWR_HOME`` of our own; returns that home.

    ``home`` is used when ``FLWR_HOME`` is not set already (a run directory; by default a
    per-user directory under the system temp dir, so nothing lands in the user's ``~/.flwr``).
    """
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "FLWR_HOME" not in os.environ:
        # one per user in the temp directory, reused (not a new directory per process)
        path = Path(home) if home is not None else Path(tempfile.gettempdir()) / f"ubsmoe-flwr-{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
        os.environ["FLWR_HOME"] = str(path)
    return Path(os.environ["FLWR_HOME"])
