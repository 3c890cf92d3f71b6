"""FedAvg of every trainable tensor, weighted by example counts (FedIT: one LoRA rank, mean of A and of B)."""

from __future__ import annotations

from ubsmoe.fl.client import ClientUpdate
from ubsmoe.fl.server import ServerState
from ubsmoe.fl.strategies.base import Strategy, example_weights, weighted_mean


class FedAvg(Strategy):
    """w_c = n_c / sum n; every tensor is the weighted mean of the clients' tensors."""

    supports_server_optimizer = True

    def aggregate(self, server: ServerState, updates: list[ClientUpdate]) -> None:
        weights = example_weights(updates)
        server.global_state = {
            name: weighted_mean([u.state[name] for u in updates], weights) for name in server.global_state
        }
