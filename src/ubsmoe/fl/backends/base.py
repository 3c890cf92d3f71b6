"""The backend interface: train a round's sampled clients, return their results by client id."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ubsmoe.fl.client import ClientPayload, ClientSpec, ClientUpdate

if TYPE_CHECKING:
    from omegaconf import DictConfig


T = TypeVar("T")


@dataclass(frozen=True)
class ClientJob:
    """One sampled client of a round: who it is (its spec) and what the server sends it."""

    spec: ClientSpec
    payload: ClientPayload
    round_idx: int

    @property
    def client_id(self) -> int:
        return self.spec.client_id


@dataclass
class ClientResult:
    """What came back for one job: an update, or the reason there is none."""

    client_id: int
    update: ClientUpdate | None
    error: str | None = None  # why no usable update came back (exception, timeout, ...)
    seconds: float = 0.0  # wall time the client's training took where it ran

    @property
    def ok(self) -> bool:
        return self.update is not None and self.error is None


class RoundContext(Protocol):
    """What a backend reads of the round loop that drives it (:class:`ubsmoe.fl.loop.FederatedLoop`)."""

    fabric: Any
    module: Any
    data: Any
    strategy: Any
    seed: int
    rounds: int
    local_steps: int | None
    local_epochs: int | None
    prox_mu: float
    faults: Any
    output_dir: Path | None


class ClientBackend(ABC):
    """Trains the sampled clients of a round. ``start`` is called once with the loop, ``close`` at the end."""

    name: str = "base"

    def launch(self, cfg: DictConfig, run: Callable[[], T]) -> T:
        """Host the run: by default call ``run`` here; a backend that needs a host (a Flower ServerApp) wraps it."""
        del cfg
        return run()

    def start(self, loop: RoundContext) -> None:
        """Bind to the loop (module, data, strategy, budgets); called once before the first round."""
        self.loop = loop

    @abstractmethod
    def train_clients(
        self, jobs: list[ClientJob], on_done: Callable[[ClientResult], None] | None = None
    ) -> list[ClientResult]:
        """Train every job; return one result per job, sorted by client id. ``on_done`` reports progress."""

    def close(self) -> None:
        """Release whatever the backend started (workers, daemons)."""
