"""What a round produced, as plain data for callbacks: client updates, per-tier evaluation, timing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ubsmoe.fl.client import ClientUpdate
from ubsmoe.fl.faults import DroppedClient


@dataclass
class TierEvaluation:
    """The global model evaluated at one tier's K_c (or rank) on the validation split(s)."""

    tier: str
    beta: float
    k: int | None
    rank: int | None
    metrics: dict[str, float]
    main_metric: float
    flops_per_example: float
    utilization: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [M] token shares
    max_load_fraction: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundSummary:
    round: int  # 1-based: the number of completed rounds
    client_ids: list[int]
    updates: list[ClientUpdate]
    evaluation: dict[str, TierEvaluation] | None
    utilization: dict[str, torch.Tensor]  # aggregated training utilization u~ per layer
    phi: dict[str, torch.Tensor]  # global phi per layer after the server update
    wall_time: float  # seconds since the start of this (possibly resumed) run, cumulative
    round_seconds: float
    train_eval_seconds: float  # time inside local training and evaluation this round
    dropped: list[DroppedClient] = field(default_factory=list)  # replies not aggregated, and why
    skipped: bool = False  # fewer good replies than federation.min_replies: the global state was kept
    broadcast_bytes: int = 0  # sent to every client of the federation after this round (per client)
    # extra per-tier fields callbacks add for metrics.jsonl (tier name -> {field: value}), e.g. grad_bias
    tier_extras: dict[str, dict[str, float]] = field(default_factory=dict)


def expert_entropy(utilization: torch.Tensor) -> float:
    """Normalised entropy of an expert-utilization vector: 1 = perfectly balanced, 0 = one expert."""
    total = float(utilization.sum())
    m = utilization.numel()
    if total <= 0 or m < 2:
        return 0.0
    p = utilization.double() / total
    h = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return float(h / torch.log(torch.tensor(float(m), dtype=torch.float64)))


def expert_cv(utilization: torch.Tensor) -> float:
    """Coefficient of variation of expert utilization (0 = balanced)."""
    u = utilization.double()
    mean = float(u.mean())
    return float(u.std(unbiased=False) / mean) if mean > 0 else 0.0
