"""Universal Pseudo-Gradient (PG): learning signals for experts a token did not activate.

Top-K routing gives no gradient to the ``M - K`` experts left out of a token, and a weak
client leaves out most of them. PG has two independent parts (each a switch):

- the router signal (:func:`router_signal`): ``y += sum_{i not in A(x)} (p_i - sg(p_i)) * sg(D_i)``,
  with ``D_i`` a running mean of expert ``i``'s output. Forward value unchanged; the router
  learns ``<dL/dy, D_i>`` for every expert, as if the inactive ones had answered with their
  typical output.
- the expert signal, with a strength ``c_i = min(eta * rho_c * P_off_i / P_on, 1)`` per expert
  (:func:`pseudo_gradient_coefficients`; ``rho_c = M / K_c``, sparser clients lean more on it;
  ``P_off_i`` the router mass expert ``i`` had where it was not active, ``P_on`` that of an
  active assignment), in one of two modes (``method.pg.expert_mode``):

  * ``missed_tokens`` (default): expert ``i``'s direction ``h_i`` is the mean gradient the
    active experts took on the tokens ``i`` missed, each token weighted by the router's
    probability for ``i`` there (:class:`MissedTokenSink`, filled by the dispatch kernel's
    backward pass). After the optimizer step, ``i``'s LoRA moves by
    ``-lr * c_i * h_i / rms(h_i)`` (:func:`missed_token_steps`): outside AdamW, so the step
    really scales with ``eta * rho_c``, with the RMS size of an Adam step at ``c_i = 1``, and
    every expert gets its own direction.
  * ``shared_mean`` (the first design, kept for ablations): ``c_i * g_bar`` is added to each
    expert's gradient before the optimizer (:func:`add_expert_pseudo_gradients`), ``g_bar``
    the per-assignment mean of the active experts' gradients. Under AdamW the scale mostly
    normalises away and all starved experts share one direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def router_signal(
    y: torch.Tensor, probs: torch.Tensor, inactive: torch.Tensor, defaults: torch.Tensor
) -> torch.Tensor:
    """``y + ((p - sg(p)) * inactive) @ sg(D)``: adds exactly zero, routes ``<dL/dy, D_i>`` to ``p_i``."""
    coefficient = (probs - probs.detach()) * inactive.to(probs.dtype)
    # A copy: the running mean is updated in place later in the same forward pass.
    return y + coefficient @ defaults.detach().clone()


@torch.no_grad()
def expert_mean_outputs(
    hidden_sums: torch.Tensor,
    counts: torch.Tensor,
    w2t: torch.Tensor,
    lora: Sequence[torch.Tensor] | None,
    scaling: float,
) -> torch.Tensor:
    """Mean output ``[M, h]`` of each expert over its tokens, from the sums of its hidden units.

    An expert's second matrix (with its LoRA) is linear, so the mean of its outputs is the
    output of the mean hidden vector: the kernels only need to return ``sum u`` per expert.
    """
    mean_hidden = hidden_sums / counts.clamp_min(1).to(hidden_sums.dtype)[:, None]  # [M, de]
    out = torch.bmm(mean_hidden[:, None, :], w2t).squeeze(1)  # [M, h]
    if lora is not None:
        _, _, a2, b2 = lora
        down = torch.bmm(mean_hidden[:, None, :], a2.transpose(1, 2))  # [M, 1, r]
        out += scaling * torch.bmm(down, b2.transpose(1, 2)).squeeze(1)
    return out


@torch.no_grad()
def update_defaults(
    defaults: torch.Tensor, ready: torch.Tensor, means: torch.Tensor, has_tokens: torch.Tensor, momentum: float
) -> None:
    """Running mean ``D_i <- momentum * D_i + (1 - momentum) * mean_i`` for experts with tokens.

    An expert's first observation replaces the (zero) initial value instead of being
    averaged with it, so the signal is not biased towards zero early in training.
    """
    blended = torch.where(ready[:, None], momentum * defaults + (1.0 - momentum) * means, means)
    defaults.copy_(torch.where(has_tokens[:, None], blended, defaults))
    ready |= has_tokens


@torch.no_grad()
def pseudo_gradient_coefficients(
    tokens: torch.Tensor,
    inactive_mass: torch.Tensor,
    active_mass: torch.Tensor,
    active_assignments: torch.Tensor,
    k: int,
    eta: float,
) -> torch.Tensor:
    """``min(eta * rho_c * P_off_i / P_on, 1)`` per expert; the cap at 1 bounds the norm by ``||g_bar||``."""
    num_experts = inactive_mass.shape[0]
    if float(tokens) <= 0 or float(active_assignments) <= 0 or float(active_mass) <= 0:
        return torch.zeros(num_experts, dtype=torch.float64)
    p_off = inactive_mass / tokens  # mean per token of the mass where expert i was not active
    p_on = active_mass / active_assignments  # mean mass of an active assignment
    rho = num_experts / k
    return (eta * rho * p_off / p_on).clamp(max=1.0)


@torch.no_grad()
def add_expert_pseudo_gradients(
    tensors: Sequence[torch.Tensor], expert_tokens: torch.Tensor, coefficients: torch.Tensor
) -> None:
    """``shared_mean`` mode: add ``coefficients[i] * g_bar`` to each expert's gradient, per stacked LoRA tensor.

    ``g_bar = sum_j G_j / sum_j t_j`` is the per-assignment mean gradient: expert ``j``'s
    gradient ``G_j`` is already a sum over its ``t_j`` tokens, so weighting it by ``t_j`` again
    (the first version) counted a busy expert about ``t_j^2`` times.
    """
    total = float(expert_tokens.to(torch.float64).sum())
    if total <= 0:
        return
    for tensor in tensors:
        grad = tensor.grad
        if grad is None:
            continue
        g_bar = grad.sum(0) / total  # [...] mean gradient of one (token, expert) assignment
        coef = coefficients.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        grad.add_(coef * g_bar.unsqueeze(0))


@dataclass
class MissedTokenSink:
    """Per expert ``i``: ``sum_x q_i(x) sum_{j in A(x)} g_j(x)`` for each LoRA tensor, and ``sum_x K q_i(x)``.

    ``q_i(x) = p_i(x)`` on the tokens where ``i`` was not active (0 elsewhere and on padding),
    ``g_j(x)`` the gradient of expert ``j``'s LoRA from token ``x`` alone. The dispatch
    kernel's backward pass adds to it (:func:`accumulate_missed_tokens`); all experts' LoRA
    tensors have the same shape, so the gradients of different experts can be summed.
    """

    sums: list[torch.Tensor | None] = field(default_factory=lambda: [None] * 4)  # A1, B1, A2, B2 ([M, ...])
    mass: torch.Tensor | None = None  # [M] sum over assignments of q_i (the per-assignment normaliser)

    def add(self, index: int, value: torch.Tensor) -> None:
        current = self.sums[index]
        self.sums[index] = value if current is None else current + value

    def directions(self) -> list[torch.Tensor | None]:
        """``h_i``: the q-weighted mean per-assignment gradient on the tokens ``i`` missed (zero if none)."""
        if self.mass is None:
            return [None] * 4
        denom = self.mass.clamp_min(1e-30)
        out = []
        for total in self.sums:
            out.append(None if total is None else total / denom.to(total.dtype).view(-1, *([1] * (total.dim() - 1))))
        return out


@torch.no_grad()
def accumulate_missed_tokens(
    sink: MissedTokenSink,
    q: torch.Tensor,
    tokens: torch.Tensor,
    *,
    x: torch.Tensor,
    dy: torch.Tensor,
    dz: torch.Tensor,
    xa: torch.Tensor,
    t1: torch.Tensor,
    u: torch.Tensor,
    t2: torch.Tensor,
    ua: torch.Tensor,
    scaling: float,
) -> None:
    """Add one backward pass's missed-token sums to ``sink``.

    ``q`` [N, M] is ``q_i(x)`` per token, ``x`` [N, h] the inputs and ``dy`` [N, h] the output
    gradients per token; ``tokens`` [A] maps each (token, expert) assignment to its token, and
    the rest are the per-assignment quantities the kernel already has: hidden gradients ``dz``
    [A, de], ``xa = x A1^T``, ``t1 = dz B1``, activations ``u`` [A, de], ``t2 = dy B2``,
    ``ua = u A2^T`` ([A, r] each). Expert ``j``'s LoRA gradient from one assignment is an
    outer product (``scaling * t1 (x) x`` for A1, ``scaling * dy (x) ua`` for B2, ...), so
    each q-weighted sum is one matrix product. For A1 and B2 one factor is the token's own
    (x, dy), so the other is first summed over the token's K assignments and the product
    runs over tokens, not assignments. About ``2 M r (h / K + d_e) * 2`` FLOPs per
    assignment, a tenth to a sixth of the experts' own forward and backward products
    (``benchmarks/pg_expert_cost.py``).
    """
    num_tokens, m = q.shape
    r = xa.shape[1]
    q = q.to(x.dtype)
    q_rows = q.index_select(0, tokens)

    def weighted(weights: torch.Tensor, factor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        # sum_row weights[row, i] factor[row] (x) other[row] for every i -> [M, r, other_dim]
        left = (weights[:, :, None] * factor[:, None, :]).reshape(weights.shape[0], m * r)
        return (left.t() @ other).view(m, r, other.shape[1]).mul_(scaling)

    def per_token(rows: torch.Tensor) -> torch.Tensor:
        return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, tokens, rows)

    sink.add(0, weighted(q, per_token(t1), x))  # A1 [M, r, h]
    sink.add(1, weighted(q_rows, xa, dz).transpose(1, 2))  # B1 [M, de, r]
    sink.add(2, weighted(q_rows, t2, u))  # A2 [M, r, de]
    sink.add(3, weighted(q, per_token(ua), dy).transpose(1, 2))  # B2 [M, h, r]
    mass = q_rows.sum(0).to(torch.float64)
    sink.mass = mass if sink.mass is None else sink.mass + mass


@torch.no_grad()
def missed_token_steps(sink: MissedTokenSink, coefficients: torch.Tensor) -> list[torch.Tensor | None]:
    """``-c_i * h_i / rms(h_i)`` per expert and LoRA tensor (to be multiplied by the learning rate).

    An expert whose direction is zero (no missed tokens, or a zero factor upstream, e.g. LoRA
    B at its zero init) gets no step.
    """
    steps: list[torch.Tensor | None] = []
    for direction in sink.directions():
        if direction is None:
            steps.append(None)
            continue
        flat = direction.reshape(direction.shape[0], -1)
        rms = flat.square().mean(1).sqrt()
        scale = torch.where(rms > 0, coefficients.to(rms.dtype) / rms.clamp_min(1e-30), torch.zeros_like(rms))
        steps.append(-(direction * scale.view(-1, *([1] * (direction.dim() - 1)))))
    return steps
