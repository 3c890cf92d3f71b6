"""Aggregation for the sparse methods (UB-SMoE, SMoE, SMoE+LLB, FLAME).

Shared tensors (attention LoRA, router, head, phi) are averaged with weights n_c. Expert
LoRA tensors (leading dim = expert) use activation-aware weights f_{c,i}^t * n_c, where
f_{c,i} is the share of client c's tokens that expert i received (FLAME; t = 0 is plain
FedAvg). PG default outputs D_i are averaged with the clients' activation counts a_{c,i},
so a weak client receives defaults for experts it never runs. phi is averaged here
(phi_bar); the DMR callback then applies the server update of docs/paper.md (DMR).

FLAME's per-tier output scales (``*.tier_scale``, one entry per tier) are averaged entry by
entry over the clients of that entry's tier only (weights n_c among them); an entry whose
tier had no client this round keeps its value. Averaging over all clients would leave each
tier only its example share of its own update, since the other tiers' clients return the
entry untouched. For the same reason the server optimizer leaves the tier scales alone
(:meth:`SparseMoEStrategy.server_optimizer_skips`): its moments are shared by every round,
so a momentum or Adam step would move the scale of a tier that sent nothing; a tier's scale
changes only through its own clients' updates.
"""

from __future__ import annotations

import torch

from ubsmoe.fl.client import ClientUpdate
from ubsmoe.fl.server import ServerState, owning_layer
from ubsmoe.fl.strategies.base import Strategy, StrategyContext, example_weights, weighted_mean
from ubsmoe.settings import MethodSettings

TIER_SCALE_SUFFIX = ".tier_scale"


class SparseMoEStrategy(Strategy):
    """FedAvg with activation-aware expert weights (exponent ``t``) and activation-weighted PG defaults."""

    supports_server_optimizer = True  # weighted means (phi is left to DMR by the loop)

    @classmethod
    def from_settings(cls, method: MethodSettings, ctx: StrategyContext) -> SparseMoEStrategy:
        return cls(ctx.expert_tensor_names, exponent=method.expert_agg_exponent)

    def __init__(self, expert_tensor_names: list[str], exponent: float = 0.0) -> None:
        self.expert_tensor_names = set(expert_tensor_names)
        self.exponent = float(exponent)

    def expert_weights(self, updates: list[ClientUpdate], layer: str) -> torch.Tensor:
        """[C, M] weights f_{c,i}^t * n_c, normalised over clients (n_c alone where an expert got no tokens)."""
        share = torch.stack(
            [u.expert_tokens(layer).to(torch.float64) / max(u.tokens(layer), 1.0) for u in updates]
        )
        n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64, device=share.device)
        raw = share.pow(self.exponent) * n[:, None]
        fallback = (n / n.sum())[:, None].expand_as(raw)
        total = raw.sum(0, keepdim=True)
        return torch.where(total > 0, raw / total.clamp_min(1e-300), fallback)

    def server_optimizer_skips(self, name: str) -> bool:
        """FLAME's tier scales: the per-tier mean of the present tiers' clients is the new value, no optimizer step."""
        return name.endswith(TIER_SCALE_SUFFIX)

    def aggregate(self, server: ServerState, updates: list[ClientUpdate]) -> None:
        weights = example_weights(updates)
        layers = list(updates[0].telemetry)
        new_state = {}
        for name in server.global_state:
            tensors = [u.state[name] for u in updates]
            if name.endswith(TIER_SCALE_SUFFIX):
                new_state[name] = self.per_tier_mean(server.global_state[name], tensors, updates)
            elif name in self.expert_tensor_names and self.exponent != 0.0:
                new_state[name] = weighted_mean(tensors, self.expert_weights(updates, owning_layer(name, layers)))
            else:
                new_state[name] = weighted_mean(tensors, weights)
        server.global_state = new_state
        server.pg_defaults = self.aggregate_pg_defaults(server.pg_defaults, updates)

    @staticmethod
    def per_tier_mean(
        previous: torch.Tensor, tensors: list[torch.Tensor], updates: list[ClientUpdate]
    ) -> torch.Tensor:
        """Entry t = the n_c-weighted mean over the clients of tier t; tiers without a client keep ``previous``."""
        out = previous.clone()
        for tier in sorted({u.spec.tier_index for u in updates}):
            members = [i for i, u in enumerate(updates) if u.spec.tier_index == tier]
            n = torch.tensor([float(updates[i].num_examples) for i in members], dtype=torch.float64)
            mean = weighted_mean([tensors[i] for i in members], n / n.sum())
            out[tier] = mean[tier]
        return out

    @staticmethod
    def aggregate_pg_defaults(
        previous: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """D_i = sum_c a_{c,i} D_{c,i} / sum_c a_{c,i}; experts nobody ran keep the previous default."""
        out = {}
        for layer in updates[0].pg_defaults:
            counts = torch.stack([u.expert_tokens(layer).to(torch.float64) for u in updates])  # [C, M]
            total = counts.sum(0)  # [M]
            mixed = weighted_mean([u.pg_defaults[layer] for u in updates], counts / total.clamp_min(1.0))
            keep = previous.get(layer, updates[0].pg_defaults[layer])
            out[layer] = torch.where((total > 0)[:, None], mixed, keep)
        return out
