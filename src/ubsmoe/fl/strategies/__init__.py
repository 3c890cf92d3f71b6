"""One strategy per federated method; :func:`build_strategy` picks it from the method settings."""

from __future__ import annotations

from ubsmoe.fl.strategies.base import Strategy
from ubsmoe.fl.strategies.fedavg import FedAvg
from ubsmoe.fl.strategies.ubsmoe import SparseMoEStrategy
from ubsmoe.settings import MethodSettings


def build_strategy(method: MethodSettings, expert_tensor_names: list[str]) -> Strategy:
    """The server-side aggregation of ``method``."""
    if method.sparse:
        return SparseMoEStrategy(expert_tensor_names, exponent=method.expert_agg_exponent)
    return FedAvg()


__all__ = ["FedAvg", "SparseMoEStrategy", "Strategy", "build_strategy"]
