"""FLoRIST (Ramesh et al., 2025, arXiv 2506.09199): stack, SVD through a small core, keep a share of the energy.

Paper: "FLoRIST: Singular Value Thresholding for Efficient and Accurate Federated
Fine-Tuning of Large Language Models". Written from the paper's algorithm, as its
reference code does it:

- every client trains a fresh rank-r_c LoRA each round (as in FLoRA) and uploads
  (A_c [r_c, n], B_c [m, r_c]) with n_c; each client's scaling s_c is folded into B_c
  (:mod:`ubsmoe.fl.strategies.lora_pairs`; the reference's ``lora_alpha = 2 * r_c`` is
  ``lora_scaling="constant"``, s_c = 2 for every rank);
- per adapted matrix the server weights p_c = n_c / sum n and stacks
  B_st = [B_1 ... B_C] [m, R] and A_st = [p_1 A_1; ...; p_C A_C] [R, n], R = sum r_c, so
  B_st A_st = sum_c p_c B_c A_c exactly (:func:`~ubsmoe.fl.strategies.flora.stack`);
- thin SVDs B_st = U_B S_B V_B^T and A_st = U_A S_A V_A^T, the small core
  P = S_B V_B^T U_A S_A [R, R] and its SVD P = U_P S V_P^T give the SVD of the update,
  U_g = U_B U_P, V_g^T = V_P^T V_A^T, without ever forming the m x n matrix
  (:func:`stacked_svd`);
- the smallest k* whose cumulative squared singular values reach tau of the total is kept
  (:func:`energy_rank`; per matrix, tau = ``method.energy_threshold``, default 0.90, the
  paper's range 0.80 to 0.99);
- every client gets B_g = U_g[:, :k*] diag(S[:k*]) and A_g = V_g^T[:k*], merged into its
  frozen weights, and starts the next round from fresh adapters.

Bytes: uplink sum_c r_c (m + n) (the rank-r_c pairs), downlink k* (m + n) to every client
of the federation each round (every client must merge every round's update, as in FLoRA).
Everything else (merged deltas, fresh adapters, the head) is shared with
:class:`~ubsmoe.fl.strategies.flora.FLoRA`.
"""

from __future__ import annotations

import torch

from ubsmoe.fl.strategies.base import StrategyContext
from ubsmoe.fl.strategies.flora import FLoRA, stack
from ubsmoe.settings import MethodSettings


def stacked_svd(
    a_stacked: torch.Tensor, b_stacked: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_g [m, q], S [q], V_g^T [q, n]) with U_g diag(S) V_g^T = B_st A_st, from two thin SVDs and a core.

    Cost O((m + n) R^2 + R^3) instead of O(m n min(m, n)); computed in float64.
    """
    a = a_stacked.to(torch.float64)
    b = b_stacked.to(torch.float64)
    u_b, s_b, vh_b = torch.linalg.svd(b, full_matrices=False)  # B_st = U_B S_B V_B^T
    u_a, s_a, vh_a = torch.linalg.svd(a, full_matrices=False)  # A_st = U_A S_A V_A^T
    core = (s_b[:, None] * vh_b) @ (u_a * s_a[None, :])  # P = S_B V_B^T U_A S_A
    u_p, s, vh_p = torch.linalg.svd(core, full_matrices=False)
    return u_b @ u_p, s, vh_p @ vh_a


def energy_rank(singular_values: torch.Tensor, tau: float) -> int:
    """The smallest k with sum_{i<k} s_i^2 >= tau * sum s_i^2 (0 when every s_i is 0)."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"the energy threshold tau={tau} must lie in (0, 1]")
    energy = singular_values.to(torch.float64).square()
    total = float(energy.sum())
    if total <= 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # a relative tolerance so that tau = 1 keeps every direction whose share rounding hides
    reached = (cumulative >= tau - 1e-12).nonzero()
    return int(reached[0]) + 1 if reached.numel() else int(energy.numel())


def threshold_update(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_g [k*, n], B_g [m, k*]) in float64: the top-k* part of sum_c p_c B_c A_c, k* by energy ``tau``."""
    a_stacked, b_stacked = stack([(a.to(torch.float64), b.to(torch.float64)) for a, b in pairs], weights)
    u_g, s, vh_g = stacked_svd(a_stacked, b_stacked)
    k = energy_rank(s, tau)
    return vh_g[:k], u_g[:, :k] * s[:k]


class FLoRIST(FLoRA):
    """FLoRA's fresh adapters and merged deltas, with the SVD-thresholded stack as each round's update."""


    @classmethod
    def from_settings(cls, method: MethodSettings, ctx: StrategyContext) -> FLoRIST:
        return cls(
            scaling=ctx.lora_scaling, seed=ctx.seed, tau=method.energy_threshold, lora_scaling=method.lora_scaling,
            init=method.flora_init,
        )  # fmt: skip

    def __init__(
        self, *, scaling: float, seed: int, tau: float = 0.9, lora_scaling: str = "constant", init: str = "independent"
    ) -> None:
        super().__init__(scaling=scaling, seed=seed, lora_scaling=lora_scaling, init=init)
        energy_rank(torch.ones(1), tau)  # validates tau
        self.tau = float(tau)

    def round_update(
        self, client: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return threshold_update(client, weights, self.tau)
