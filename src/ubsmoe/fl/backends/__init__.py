"""How the sampled clients of a round get trained: the one thing that differs between backends.

The round loop (:class:`~ubsmoe.fl.loop.FederatedLoop`) samples clients, shapes their
payloads, aggregates, evaluates and checkpoints the same way whatever the backend; it
hands the backend a list of :class:`ClientJob` and gets back one :class:`ClientResult`
per job, sorted by client id so that aggregation order (and so every number) does not
depend on where or in which order the clients ran.
"""

from __future__ import annotations

from ubsmoe import names
from ubsmoe.fl.backends.base import ClientBackend, ClientJob, ClientResult
from ubsmoe.fl.backends.flower import FlowerBackend
from ubsmoe.fl.backends.local import LocalBackend

# ``backend.name`` -> the class that runs it (the allowed names derive from this registry).
# ``flower`` imports Flower only when built (the core install has no flwr).
BACKENDS: dict[str, type[ClientBackend]] = {"local": LocalBackend, "flower": FlowerBackend}
assert tuple(BACKENDS) == names.BACKENDS, "ubsmoe.names.BACKENDS and BACKENDS must list the same backends"


def build_backend(name: str, **options: object) -> ClientBackend:
    """The backend registered under ``name``, built with the ``backend`` group's other keys."""
    return BACKENDS[name](**options)


__all__ = ["BACKENDS", "ClientBackend", "ClientJob", "ClientResult", "FlowerBackend", "LocalBackend", "build_backend"]
