"""The Strategy interface: how a method shapes what each client gets and merges what comes back.

As in Flower's strategies, client logic and server aggregation are separate, plain
pieces: a strategy reads and writes named tensors of the trainable state and the
statistics a :class:`~ubsmoe.fl.client.ClientUpdate` carries; it never reaches into the
model's layers.

Devices: a strategy's inputs (the server state and the received updates) all lie on the
server's device (:mod:`ubsmoe.fl.devices`); every tensor it creates is created there too
(weights from example counts included), so no helper mixes devices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ubsmoe.fl.aggregators import active_rule
from ubsmoe.fl.client import ClientPayload, ClientSpec, ClientUpdate, tensor_bytes
from ubsmoe.fl.server import ServerState
from ubsmoe.settings import MethodSettings

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy may need from the model and the run besides the method settings."""

    expert_tensor_names: list[str]
    lora_scaling: float  # alpha / r of the full-rank adapters
    seed: int  # the strategy's own seed (e.g. FLoRA's fresh adapters)


class Strategy(ABC):
    """Base class of every federated method.

    ``name`` is the method the strategy serves (``method.name``, set by
    :func:`ubsmoe.fl.strategies.build_strategy`); one class may serve several methods that
    differ only in their client-side settings (UB-SMoE, SMoE, SMoE+LLB and FLAME).
    """

    name: str = "unnamed"
    # True when the new global state is an average of the clients' states, so that its
    # change is a pseudo-gradient a server optimizer may apply (ubsmoe.fl.server_optim).
    # Opt-in: a method that merges or re-factorises keeps plain replacement.
    supports_server_optimizer: bool = False

    @classmethod
    def from_settings(cls, method: MethodSettings, ctx: StrategyContext) -> Strategy:
        """The strategy of ``method`` (a subclass with constructor arguments overrides this)."""
        del method, ctx
        return cls()

    def client_spec(self, spec: ClientSpec) -> ClientSpec:
        """The compute shape a client trains with this round (HetLoRA lowers r_c after self-pruning)."""
        return spec

    def configure_client(self, server: ServerState, spec: ClientSpec) -> ClientPayload:
        """The payload for one client; by default the global state as it is."""
        return ClientPayload(state=server.global_state, pg_defaults=server.pg_defaults)

    def payload_bytes(self, payload: ClientPayload, spec: ClientSpec) -> int:
        """Bytes the server really sends this client (methods that truncate count only what is sent)."""
        del spec
        return payload.num_bytes()

    def broadcast_bytes(self, server: ServerState) -> int:
        """Bytes every client of the federation, sampled or not, receives after this round (FLoRA's stack)."""
        del server
        return 0

    def update_bytes(self, update: ClientUpdate) -> int:
        """Bytes the client really sends back."""
        return tensor_bytes(update.state) + tensor_bytes(update.pg_defaults)

    def server_optimizer_skips(self, name: str) -> bool:
        """True for a global tensor the strategy sets by a rule of its own that the server optimizer must leave
        (FLAME's per-tier scales); by default the optimizer steps every averaged tensor."""
        del name
        return False

    def place(self, device: torch.device) -> None:
        """Move whatever tensors the strategy keeps across rounds to the server's device (after a resume)."""
        del device

    def client_regularizer(self, spec: ClientSpec) -> Callable[[torch.nn.Module], torch.Tensor] | None:
        """A method's extra client-side loss term (None: the model's own loss only)."""
        del spec
        return None

    @abstractmethod
    def aggregate(self, server: ServerState, updates: list[ClientUpdate]) -> None:
        """Merge the round's client updates into ``server`` (in place)."""

    def state_dict(self) -> dict[str, Any]:
        """Whatever the strategy keeps across rounds (checkpointed with the run)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def example_weights(updates: list[ClientUpdate]) -> torch.Tensor:
    """w_c = n_c / sum n over the round's clients."""
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    return n / n.sum()


def weighted_mean(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_c weights[c] * tensors[c], accumulated in float64 and cast back.

    ``weights`` has shape [C] (one weight a client) or [C, E] (one per client and leading
    index, e.g. per expert); rows are expected to sum to 1 over clients.
    ``server.aggregator`` may replace the mean by a robust rule (:mod:`ubsmoe.fl.aggregators`).
    """
    stacked = torch.stack([t.to(torch.float64) for t in tensors])
    w = weights.to(device=stacked.device, dtype=torch.float64)  # weights follow the tensors they weigh
    w = w.reshape(w.shape + (1,) * (stacked.dim() - w.dim()))
    return active_rule()(stacked, w.expand_as(stacked)).to(tensors[0].dtype)
