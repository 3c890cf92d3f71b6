"""FedIT: every client trains LoRA at one rank and the server takes the n_c-weighted mean of A and of B."""

from __future__ import annotations

import torch

from ubsmoe.fl.strategies.base import StrategyContext, weighted_mean
from ubsmoe.fl.strategies.lora_pairs import LoraRankStrategy, pad_pair, pair_rank
from ubsmoe.settings import MethodSettings


class FedIT(LoraRankStrategy):
    """FedIT: one rank for every client (r, or the smallest tier's r_c), the n_c-weighted mean of A and of B.

    The same numbers as FedAvg over the whole state; as a rank strategy it truncates the
    payload and counts bytes at the rank the clients train (``method.homogeneous_rank``).
    """

    @classmethod
    def from_settings(cls, method: MethodSettings, ctx: StrategyContext) -> FedIT:
        strategy = cls()
        strategy.set_lora_scaling(method.lora_scaling, ctx.lora_scaling)
        return strategy

    def merge_pair(
        self,
        prefix: str,
        client: list[tuple[torch.Tensor, torch.Tensor]],
        weights: torch.Tensor,
        global_a: torch.Tensor,
        global_b: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        full = pair_rank(global_a, global_b)
        padded = [pad_pair(a, b, full) for a, b in client]
        return weighted_mean([a for a, _ in padded], weights), weighted_mean([b for _, b in padded], weights)
