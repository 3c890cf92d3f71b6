"""One strategy per federated method, found by name in :data:`STRATEGIES`.

The registry is the one list of methods: ``method.name`` must be one of its keys (the
config check and ``make compare`` derive the allowed names from it), and each entry builds
the method's server-side aggregation from the method settings and a
:class:`StrategyContext`. Adding a method: a Strategy subclass, one entry here, one
``configs/method/NAME.yaml`` (docs/adding_a_method.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ubsmoe.errors import ConfigError
from ubsmoe.fl.strategies.base import Strategy
from ubsmoe.fl.strategies.fedavg import FedAvg
from ubsmoe.fl.strategies.flexlora import FlexLoRA
from ubsmoe.fl.strategies.flora import FLoRA
from ubsmoe.fl.strategies.florist import FLoRIST
from ubsmoe.fl.strategies.hetlora import HetLoRA
from ubsmoe.fl.strategies.lora_pairs import FedIT
from ubsmoe.fl.strategies.ubsmoe import SparseMoEStrategy
from ubsmoe.settings import MethodSettings


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy may need from the model and the run besides the method settings."""

    expert_tensor_names: list[str]
    lora_scaling: float  # alpha / r of the full-rank adapters
    seed: int  # the strategy's own seed (e.g. FLoRA's fresh adapters)


def _with_scaling(strategy: Strategy, method: MethodSettings) -> Strategy:
    """A rank strategy that needs no scaling value, told how the clients scale their adapters."""
    strategy.set_lora_scaling(method.lora_scaling)
    return strategy


StrategyFactory = Callable[[MethodSettings, StrategyContext], Strategy]


def _sparse_moe(method: MethodSettings, ctx: StrategyContext) -> Strategy:
    """UB-SMoE, SMoE, SMoE+LLB and FLAME share one aggregation, told apart by their settings."""
    return SparseMoEStrategy(ctx.expert_tensor_names, exponent=method.expert_agg_exponent)


STRATEGIES: dict[str, StrategyFactory] = {
    "ubsmoe": _sparse_moe,
    "smoe": _sparse_moe,
    "smoe_llb": _sparse_moe,
    "flame": _sparse_moe,
    "fedit": lambda method, ctx: _with_scaling(FedIT(), method),
    "hetlora": lambda method, ctx: _with_scaling(
        HetLoRA(gamma=method.self_pruning.gamma, strength=method.self_pruning.strength), method
    ),
    "flexlora": lambda method, ctx: FlexLoRA(scaling=ctx.lora_scaling, lora_scaling=method.lora_scaling),
    "flora": lambda method, ctx: FLoRA(
        scaling=ctx.lora_scaling, seed=ctx.seed, lora_scaling=method.lora_scaling, init=method.flora_init
    ),
    "florist": lambda method, ctx: FLoRIST(
        scaling=ctx.lora_scaling, seed=ctx.seed, tau=method.energy_threshold, lora_scaling=method.lora_scaling,
        init=method.flora_init,
    ),
}

METHODS: tuple[str, ...] = tuple(STRATEGIES)


def build_strategy(method: MethodSettings, ctx: StrategyContext) -> Strategy:
    """The server-side aggregation of ``method`` (a name without a registered strategy is an error)."""
    factory = STRATEGIES.get(method.name)
    if factory is None:
        raise ConfigError("method.name", method.name, f"one of {', '.join(METHODS)}")
    return factory(method, ctx)


__all__ = [
    "METHODS",
    "STRATEGIES",
    "FLoRA",
    "FLoRIST",
    "FedAvg",
    "FedIT",
    "FlexLoRA",
    "HetLoRA",
    "SparseMoEStrategy",
    "Strategy",
    "StrategyContext",
    "build_strategy",
]
