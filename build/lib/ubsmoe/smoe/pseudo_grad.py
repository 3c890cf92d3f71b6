"""Universal Pseudo-Gradient (PG): learning signals for experts a token did not activate.

Top-K routing gives no gradient to the ``M - K`` experts left out of a token, and a weak
client leaves out most of them. PG has two independent parts (each a switch):

- the router signal (:func:`router_signal`): ``y += sum_{i not in A(x)} (p_i - sg(p_i)) * sg(D_i)``,
  with ``D_i`` a running mean of expert ``i``'s output. Forward value unchanged; the router
  learns ``<dL/dy, D_i>`` for every expert, as if the inactive ones had answered with their
  typical output.
- the expert signal (:func:`add_expert_pseudo_gradients`): after backward, every expert's LoRA
  gradient gets ``eta * rho_c * (P_off_i / P_on) * g_bar`` added, ``g_bar`` being the
  token-weighted mean of the real gradients of the experts that got tokens, ``rho_c = M/K_c``
  (sparser clients lean more on it), the added norm capped at ``||g_bar||``.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    """Add ``coefficients[i] * g_bar`` to each expert's gradient, for each stacked LoRA tensor.

    ``g_bar`` is the token-weighted mean (weights ``expert_tokens``) of the experts' real
    gradients; experts with no tokens have zero real gradient and zero weight.
    """
    weights = expert_tokens.to(torch.float64)
    total = float(weights.sum())
    if total <= 0:
        return
    for tensor in tensors:
        grad = tensor.grad
        if grad is None:
            continue
        w = (weights / total).to(grad.dtype)
        g_bar = torch.tensordot(w, grad, dims=1)  # [...] mean over experts
        coef = coefficients.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        grad.add_(coef * g_bar.unsqueeze(0))
