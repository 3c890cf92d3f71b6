"""One strategy per federated method, found by method name in :data:`STRATEGIES`.

Each entry maps a name of :data:`ubsmoe.names.METHODS` to the class that aggregates it;
the class builds itself from the method settings and a :class:`StrategyContext`
(:meth:`Strategy.from_settings`). UB-SMoE, SMoE, SMoE+LLB and FLAME share one class and
differ in their client-side settings. Adding a method: a Strategy subclass in its own
file, its name in ``ubsmoe.names.METHODS`` and here, one ``configs/method/NAME.yaml``
(docs/adding_a_method.md).
"""

from __future__ import annotations

from ubsmoe import names
from ubsmoe.errors import ConfigError
from ubsmoe.fl.strategies.base import Strategy, StrategyContext
from ubsmoe.fl.strategies.fedavg import FedAvg
from ubsmoe.fl.strategies.fedit import FedIT
from ubsmoe.fl.strategies.flexlora import FlexLoRA
from ubsmoe.fl.strategies.flora import FLoRA
from ubsmoe.fl.strategies.florist import FLoRIST
from ubsmoe.fl.strategies.hetlora import HetLoRA
from ubsmoe.fl.strategies.sparse_moe import SparseMoEStrategy
from ubsmoe.settings import MethodSettings

STRATEGIES: dict[str, type[Strategy]] = {
    "ubsmoe": SparseMoEStrategy,
    "smoe": SparseMoEStrategy,
    "smoe_llb": SparseMoEStrategy,
    "flame": SparseMoEStrategy,
    "fedit": FedIT,
    "hetlora": HetLoRA,
    "flexlora": FlexLoRA,
    "flora": FLoRA,
    "florist": FLoRIST,
}
assert tuple(STRATEGIES) == names.METHODS, "ubsmoe.names.METHODS and STRATEGIES must list the same methods"


def build_strategy(method: MethodSettings, ctx: StrategyContext) -> Strategy:
    """The server-side aggregation of ``method`` (a name without a registered strategy is an error)."""
    cls = STRATEGIES.get(method.name)
    if cls is None:
        raise ConfigError("method.name", method.name, f"one of {', '.join(names.METHODS)}")
    strategy = cls.from_settings(method, ctx)
    strategy.name = method.name
    return strategy


__all__ = [
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
