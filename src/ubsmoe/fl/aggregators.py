"""How the clients' tensors are combined wherever a method averages them (``server.aggregator``).

Every strategy averages through :func:`ubsmoe.fl.strategies.base.weighted_mean` (weights
n_c / sum n, or per-expert weights); that helper asks :func:`active_rule` which rule is in
force for the aggregation under way, so a robust rule applies to everything a method
averages (LoRA factors, router, head, phi, PG defaults) without touching the strategies:

- ``mean``: the weighted mean itself;
- ``median``: the coordinate-wise weighted median (Yin et al., 2018): the value where the
  clients' cumulative weight, sorted by value, reaches 1/2 (midway between two values when
  it lands exactly on 1/2, so equal weights give the ordinary median);
- ``trimmed_mean``: the coordinate-wise weighted trimmed mean: the clients' weights, sorted
  by value, are cut by ``trim_fraction`` of the total at each end (a client straddling a cut
  keeps the part inside) and the rest is averaged; with equal weights and a fraction times
  the count an integer, this is the ordinary trimmed mean that drops that many clients a side;
- ``krum``: Multi-Krum (Blanchard et al., 2017) selects whole clients before the method
  averages (:func:`multi_krum`), so it is not a coordinate rule: the method's own mean then
  runs over the selected clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ubsmoe import names

Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (values [C, ...], weights [C, ...]) -> [...]


def mean_rule(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_c w_c v_c per coordinate (the weights sum to 1 over clients, as weighted_mean's callers give them)."""
    return (values * weights).sum(0)


def _sorted_with_weights(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values sorted over clients per coordinate, their weights normalised to 1 and sorted alongside."""
    order = values.argsort(dim=0, stable=True)
    w = weights / weights.sum(0, keepdim=True).clamp_min(1e-300)
    return values.gather(0, order), w.gather(0, order)


def median_rule(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted median per coordinate (midway when the cumulative weight hits 1/2 exactly)."""
    v, w = _sorted_with_weights(values, weights)
    cumulative = w.cumsum(0)
    tol = 1e-12
    lower = (cumulative < 0.5 - tol).sum(0, keepdim=True).clamp_max(v.shape[0] - 1)
    upper = (cumulative <= 0.5 + tol).sum(0, keepdim=True).clamp_max(v.shape[0] - 1)
    return 0.5 * (v.gather(0, lower) + v.gather(0, upper)).squeeze(0)


def trimmed_mean_rule(fraction: float) -> Rule:
    """The weighted mean of the part of the weight between ``fraction`` and ``1 - fraction``, per coordinate."""

    def rule(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        v, w = _sorted_with_weights(values, weights)
        upper_edge = w.cumsum(0)
        lower_edge = upper_edge - w
        kept = (upper_edge.clamp_max(1.0 - fraction) - lower_edge.clamp_min(fraction)).clamp_min(0.0)
        return (v * kept).sum(0) / (1.0 - 2.0 * fraction)

    return rule


# server.aggregator -> its coordinate rule given trim_fraction (krum: the mean over the clients it selects)
AGGREGATORS: dict[str, Callable[[float], Rule]] = {
    "mean": lambda fraction: mean_rule,
    "median": lambda fraction: median_rule,
    "trimmed_mean": trimmed_mean_rule,
    "krum": lambda fraction: mean_rule,
}
assert tuple(AGGREGATORS) == names.AGGREGATORS, "ubsmoe.names.AGGREGATORS and AGGREGATORS must match"


def coordinate_rule(aggregator: str, trim_fraction: float) -> Rule:
    """The coordinate rule of ``server.aggregator``."""
    if aggregator not in AGGREGATORS:
        raise ValueError(f"server.aggregator={aggregator!r}: one of {', '.join(names.AGGREGATORS)}")
    return AGGREGATORS[aggregator](trim_fraction)


def multi_krum(vectors: torch.Tensor, byzantine: int, select: int | None = None) -> list[int]:
    """Indices (ascending) of the ``select`` clients with the lowest Krum scores; 1 is Krum itself.

    ``vectors`` [C, D] are the clients' flattened updates. A client's score is the sum of its
    squared distances to its ``C - f - 2`` nearest other clients (at least one). ``select``
    None keeps ``C - f`` clients (Multi-Krum's usual m).
    """
    count = vectors.shape[0]
    keep = count - byzantine if select is None else select
    keep = max(1, min(keep, count))
    if count == 1:
        return [0]
    x = vectors.to(torch.float64)
    distances = torch.cdist(x, x).pow(2)
    neighbours = max(1, min(count - byzantine - 2, count - 1))
    nearest = distances.sort(dim=1).values[:, 1 : neighbours + 1]  # column 0: the client itself
    scores = nearest.sum(1)
    chosen = scores.argsort(stable=True)[:keep]
    return sorted(int(i) for i in chosen)


_ACTIVE: list[Rule] = []


@contextmanager
def aggregating_with(rule: Rule) -> Iterator[None]:
    """Make ``rule`` the one :func:`ubsmoe.fl.strategies.base.weighted_mean` applies while the block runs."""
    _ACTIVE.append(rule)
    try:
        yield
    finally:
        _ACTIVE.pop()


def active_rule() -> Rule:
    """The rule of the aggregation under way (the weighted mean outside one)."""
    return _ACTIVE[-1] if _ACTIVE else mean_rule
