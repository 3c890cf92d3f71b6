"""FlexLoRA (Bai et al., 2024): aggregate the full LoRA update, hand each client its top-r_c SVD part.

Paper: "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources".

Averaging A and B separately is not averaging the updates (mean(B) mean(A) != mean(B A)),
and with different ranks the factors do not even line up. FlexLoRA therefore aggregates
the full-size update of every adapted layer,

    dW = sum_c w_c * s * B_c A_c,    w_c = n_c / sum n,  s = alpha / r (the LoRA scaling),

keeps dW as the global model, and hands each client the best rank-r_c approximation of
it, from the SVD dW = U S V^T truncated to the top r_c singular triplets.

The split of the truncated SVD into factors: B = U_r S_r / s and A = V_r^T (so
s * B A = U_r S_r V_r^T). Keeping A orthonormal and putting the magnitudes in B mirrors
LoRA's own convention (A carries directions, B starts at zero): a direction whose singular
value is zero still has a non-zero row of A and a zero column of B, so it stays trainable.
With the symmetric split sqrt(S) on both sides such a component would have A and B both
zero, and LoRA gradients could never revive it. The SVD is computed in float64.

The global state's LoRA pair holds the rank-``r`` factors of dW (top r triplets, ordered
by singular value), so truncating it to r_c, which :meth:`configure_client` and the
rank limiter at evaluation do, is exactly the top-r_c approximation; the next round's dW
is built from the clients' pairs alone, so dW itself need not be kept (the reference keeps
no more). This split is the reference's own, not a departure. Before the first aggregation there is no dW and clients get the truncated initial pair
(random A, zero B). Tensors outside the pairs are averaged with n_c.

``scaling`` is alpha / r, the full-rank LoRA scaling. With ``lora_scaling="per_rank"`` (the
reference: a rank-r_c adapter scaled by alpha / r_c) a client's pair enters dW with its own
s_c = alpha / r_c and receives B = U S / s_c (see :mod:`ubsmoe.fl.strategies.lora_pairs`);
with ``"max_rank"`` every client uses s.
"""

from __future__ import annotations

import torch

from ubsmoe.fl.strategies.base import StrategyContext
from ubsmoe.fl.strategies.lora_pairs import LoraRankStrategy, pair_rank
from ubsmoe.settings import MethodSettings



def aggregate_delta(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """dW = scaling * sum_c weights[c] * B_c A_c, in float64."""
    if not pairs:
        raise ValueError("no client pairs to aggregate")
    out = None
    for (a, b), w in zip(pairs, weights.to(device=pairs[0][0].device, dtype=torch.float64), strict=True):
        pair_rank(a, b)
        term = w * (b.to(torch.float64) @ a.to(torch.float64))
        out = term if out is None else out + term
    assert out is not None
    return scaling * out


def svd_factors(
    delta: torch.Tensor, rank: int, full_rank: int, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``full_rank`` factors A [R, in], B [out, R] with scaling * B @ A the best rank-``rank`` fit of ``delta``.

    Components beyond ``rank`` are zero. B = U_r S_r / scaling, A = V_r^T (see the module
    docstring for the choice of split). Returned in float64.
    """
    out_dim, in_dim = delta.shape
    if not 1 <= rank <= full_rank:
        raise ValueError(f"rank={rank} must lie in [1, {full_rank}]")
    if full_rank > min(out_dim, in_dim):
        raise ValueError(f"LoRA rank {full_rank} exceeds the size {tuple(delta.shape)} of the layer")
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    a = torch.zeros(full_rank, in_dim, dtype=torch.float64, device=delta.device)
    b = torch.zeros(out_dim, full_rank, dtype=torch.float64, device=delta.device)
    a[:rank] = vh[:rank]
    b[:, :rank] = u[:, :rank] * (s[:rank] / scaling)
    return a, b


class FlexLoRA(LoraRankStrategy):
    """Aggregate the full update dW, hand each client the top-r_c SVD factors of it."""

    # The global pair is the SVD factorisation of the aggregated product, not a mean of the
    # clients' factors: their difference to the previous factors is no pseudo-gradient.
    supports_server_optimizer = False

    @classmethod
    def from_settings(cls, method: MethodSettings, ctx: StrategyContext) -> FlexLoRA:
        return cls(scaling=ctx.lora_scaling, lora_scaling=method.lora_scaling)

    def __init__(self, *, scaling: float = 1.0, lora_scaling: str = "max_rank") -> None:
        if not scaling > 0:
            raise ValueError(f"LoRA scaling must be positive, got {scaling}")
        self.scaling = float(scaling)
        self.set_lora_scaling(lora_scaling, scaling)

    def merge_pair(
        self,
        prefix: str,
        client: list[tuple[torch.Tensor, torch.Tensor]],
        weights: torch.Tensor,
        global_a: torch.Tensor,
        global_b: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """dW = sum_c w_c s_c B_c A_c; the global pair holds its top-r SVD factors (all the next round needs)."""
        full = pair_rank(global_a, global_b)
        delta = aggregate_delta(client, weights, self.scaling)
        return svd_factors(delta, full, full, self.scaling)
