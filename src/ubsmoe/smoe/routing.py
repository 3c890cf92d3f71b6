"""Top-K routing with Dynamic Modulated Routing (DMR), unit gates, and the routing losses.

Everything here works on one layer's router logits ``s`` of shape ``[tokens, M]`` and is
pure torch, so the layer, the tests and the benchmark all share exactly one definition of
the mechanism of docs/paper.md:

- candidates ``T(x)`` = the top ``N_p`` experts of the raw logits ``s``: ``N_p`` absolute (the
  paper's form, ``num_candidates``) or ``min(M, ceil(np_ratio * K))``, never below ``K``;
- modulated logits ``m = s + kappa * phi`` on ``T(x)`` only (``m = s`` without DMR; ``kappa`` is
  the project's extension, 1 = the paper);
- ``p = softmax(m)`` and the active set ``A(x)`` = the top ``K`` of ``m`` among the candidates
  (with DMR; all experts without it), so ``A(x)`` always lies inside ``T(x)``: a negative phi
  can push a candidate down, but never let a non-candidate in;
- gates ``g = 1 + p - stopgrad(p)``: value exactly 1, so cutting a dense FFN into experts
  and running all of them reproduces the FFN, while the router still gets a gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """The routing decision of one layer for a flat batch of tokens."""

    logits: torch.Tensor  # [N, M] modulated logits m (equal to s without DMR)
    probs: torch.Tensor  # [N, M] softmax(m), differentiable
    experts: torch.Tensor  # [N, K] indices of the active experts, best first
    active: torch.Tensor  # [N, M] bool, True where expert i is in A(x)


def num_candidates(k: int, num_experts: int, np_ratio: float, absolute: int | None = None) -> int:
    """``N_p``: ``absolute`` when given (the paper's fixed N_p), else ``ceil(np_ratio * K)``.

    Capped at ``M`` and never below ``K`` (the active set lies inside the candidates), so a
    fixed ``N_p`` gives every tier with ``K_c <= N_p`` the same candidate set.
    """
    wanted = absolute if absolute is not None else math.ceil(np_ratio * k)
    return max(k, min(num_experts, wanted))


def modulate(logits: torch.Tensor, phi: torch.Tensor, kappa: float, n_candidates: int) -> torch.Tensor:
    """DMR: add ``kappa * phi`` to the logits of each token's top ``n_candidates`` experts.

    Restricting the modulation to the candidates keeps phi from pulling an expert that the
    router considers irrelevant for a token into its active set: phi only re-ranks experts
    the router already finds plausible.
    """
    shifted = logits + kappa * phi
    num_experts = logits.shape[-1]
    if n_candidates >= num_experts:
        return shifted
    return torch.where(candidate_mask(logits, n_candidates), shifted, logits)


def candidate_mask(logits: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """[N, M] bool: True on each token's top ``n_candidates`` experts of the (unmodulated) ``logits``."""
    candidates = logits.detach().topk(n_candidates, dim=-1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, candidates, True)


def route(
    logits: torch.Tensor,
    k: int,
    *,
    phi: torch.Tensor | None = None,
    kappa: float = 1.0,
    np_ratio: float = 2.0,
    n_candidates: int | None = None,
) -> Routing:
    """Top-``k`` routing of ``logits`` [N, M], modulated by ``phi`` [M] when it is given (DMR on).

    ``n_candidates`` is the absolute ``N_p`` (None: from ``np_ratio``), see :func:`num_candidates`.
    """
    num_experts = logits.shape[-1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must lie in [1, {num_experts}]")
    selection_mask = None
    if phi is not None:
        n_p = num_candidates(k, num_experts, np_ratio, n_candidates)
        if n_p < num_experts:
            selection_mask = candidate_mask(logits, n_p)
        logits = modulate(logits, phi, kappa, n_p)
    probs = torch.softmax(logits, dim=-1)
    if k == num_experts:
        experts = torch.arange(num_experts, device=logits.device).expand(logits.shape[0], num_experts)
        active = torch.ones_like(logits, dtype=torch.bool)
    else:
        selection = logits.detach()
        if selection_mask is not None:  # the top K of m among the candidates T(x)
            selection = selection.masked_fill(~selection_mask, float("-inf"))
        experts = selection.topk(k, dim=-1).indices
        active = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, experts, True)
    return Routing(logits=logits, probs=probs, experts=experts, active=active)


def unit_gates(probs: torch.Tensor) -> torch.Tensor:
    """``1 + p - stopgrad(p)``: forward value exactly 1, gradient that of ``p``.

    ``p - p.detach()`` is exactly zero in IEEE arithmetic for finite ``p``, so the gate
    multiplies by one bit-for-bit; the backward pass still carries ``dL/dg`` into the router.
    """
    return 1.0 + (probs - probs.detach())


def range_penalty(phi: torch.Tensor, phi_min: float, phi_max: float, weight: float) -> torch.Tensor:
    """``weight * (||relu(phi_min - phi)||^2 + ||relu(phi - phi_max)||^2)``: zero inside the range."""
    below = torch.relu(phi_min - phi)
    above = torch.relu(phi - phi_max)
    return weight * (below.square().sum() + above.square().sum())


def switch_balance_loss(
    probs: torch.Tensor, expert_counts: torch.Tensor, k: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``M * sum_i f_i * P_i`` (1 at perfect balance).

    ``f_i`` is the fraction of the ``N * K`` assignments that went to expert ``i`` (no
    gradient), ``P_i`` the mean router probability of expert ``i`` over the ``N`` tokens.
    ``valid`` ``[N]`` (bool) restricts both to the real tokens without indexing by it (no
    host synchronisation on a GPU).
    """
    num_tokens, num_experts = probs.shape
    if num_tokens == 0:
        return probs.sum() * 0.0
    if valid is None:
        fraction = expert_counts.to(probs.dtype) / float(num_tokens * k)
        mean_prob = probs.mean(dim=0)
    else:
        real = valid.to(probs.dtype)
        n = real.sum().clamp_min(1.0)
        fraction = expert_counts.to(probs.dtype) / (n * k)
        mean_prob = (real @ probs) / n
    return num_experts * (fraction * mean_prob).sum()
