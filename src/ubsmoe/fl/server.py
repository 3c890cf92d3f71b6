"""Server side: the global state a federation carries between rounds, and the client sampler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ubsmoe.fl.devices import move_tensors

Tensors = dict[str, torch.Tensor]


class ClientSampler:
    """Samples ``per_round`` distinct clients a round from its own seeded generator.

    Its generator is separate from the partitioner's and the model's, so changing the
    number of rounds or clients per round never changes the data split or the init.
    """

    def __init__(self, num_clients: int, per_round: int, seed: int) -> None:
        self.num_clients = num_clients
        self.per_round = per_round
        self._rng = np.random.default_rng(seed)

    def sample(self) -> list[int]:
        chosen = self._rng.choice(self.num_clients, size=self.per_round, replace=False)
        return sorted(int(c) for c in chosen)

    def state_dict(self) -> dict[str, Any]:
        return {"bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["bit_generator"]


@dataclass
class ServerState:
    """Everything global the server keeps: trainable state (LoRA, router, phi, head) and PG defaults.

    ``utilization`` is the last round's aggregated expert utilization u~ per SMoE layer,
    kept for logging and for the DMR update.
    """

    round: int
    global_state: Tensors
    pg_defaults: Tensors = field(default_factory=dict)
    utilization: Tensors = field(default_factory=dict)

    def to(self, device: torch.device | str) -> ServerState:
        """The same state with every tensor on ``device`` (the server's one device)."""
        return ServerState(
            round=self.round,
            global_state=move_tensors(self.global_state, device),
            pg_defaults=move_tensors(self.pg_defaults, device),
            utilization=move_tensors(self.utilization, device),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "global_state": self.global_state,
            "pg_defaults": self.pg_defaults,
            "utilization": self.utilization,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ServerState:
        return cls(
            round=int(state["round"]),
            global_state=dict(state["global_state"]),
            pg_defaults=dict(state["pg_defaults"]),
            utilization=dict(state["utilization"]),
        )


def owning_layer(tensor_name: str, layers: list[str]) -> str:
    """The SMoE layer (telemetry key) a named tensor belongs to: the longest key on a '.' boundary."""
    matches = [
        layer
        for layer in layers
        if tensor_name == layer or f".{layer}." in f".{tensor_name}" or tensor_name.startswith(f"{layer}.")
    ]
    if not matches:
        raise KeyError(f"tensor {tensor_name!r} belongs to none of the SMoE layers {layers}")
    return max(matches, key=len)


def aggregate_utilization(updates: list[Any]) -> Tensors:
    """u~_i = sum_c w_c * a_{c,i} / n_c with w_c = n_c / sum n (token counts), per SMoE layer.

    Equivalently sum_c a_{c,i} / sum_c n_c: the fraction of all routed tokens that chose
    expert i. It sums to K_bar = sum_c w_c K_c over experts.
    """
    if not updates or not updates[0].telemetry:
        return {}
    out: Tensors = {}
    for layer in updates[0].telemetry:
        routed = torch.stack([u.expert_tokens(layer).to(torch.float64) for u in updates]).sum(0)
        tokens = sum(u.tokens(layer) for u in updates)
        out[layer] = (routed / max(tokens, 1.0)).to(torch.float32)
    return out


def mean_active_experts(updates: list[Any]) -> dict[str, float]:
    """K_bar = sum_c w_c * K_c per layer, with w_c the clients' token shares."""
    if not updates or not updates[0].telemetry:
        return {}
    out = {}
    for layer in updates[0].telemetry:
        tokens = torch.tensor([u.tokens(layer) for u in updates], dtype=torch.float64)
        ks = torch.tensor([float(u.spec.k or 0) for u in updates], dtype=torch.float64)
        out[layer] = float((tokens * ks).sum() / tokens.sum().clamp_min(1.0))
    return out
