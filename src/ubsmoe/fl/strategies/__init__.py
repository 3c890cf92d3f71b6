"""One strategy per federated method; :func:`build_strategy` picks it from the method settings."""

from __future__ import annotations

from ubsmoe.fl.strategies.base import Strategy
from ubsmoe.fl.strategies.fedavg import FedAvg
from ubsmoe.fl.strategies.flexlora import FlexLoRA
from ubsmoe.fl.strategies.flora import FLoRA
from ubsmoe.fl.strategies.hetlora import HetLoRA
from ubsmoe.fl.strategies.ubsmoe import SparseMoEStrategy
from ubsmoe.settings import MethodSettings


def build_strategy(
    method: MethodSettings, *, expert_tensor_names: list[str], lora_scaling: float, seed: int
) -> Strategy:
    """The server-side aggregation of ``method``.

    Sparse methods (ubsmoe, smoe, smoe_llb, flame) share one strategy, told apart by their
    settings (FLAME's activation-aware exponent); FedIT is FedAvg of A and of B.
    """
    if method.sparse:
        return SparseMoEStrategy(expert_tensor_names, exponent=method.expert_agg_exponent)
    if method.name == "hetlora":
        return HetLoRA(gamma=method.self_pruning.gamma, strength=method.self_pruning.strength)
    if method.name == "flexlora":
        return FlexLoRA(scaling=lora_scaling)
    if method.name == "flora":
        return FLoRA(scaling=lora_scaling, seed=seed)
    return FedAvg()


__all__ = ["FLoRA", "FedAvg", "FlexLoRA", "HetLoRA", "SparseMoEStrategy", "Strategy", "build_strategy"]
