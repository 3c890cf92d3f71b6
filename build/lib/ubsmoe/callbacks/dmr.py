"""Dynamic Modulated Routing: the server update of phi from globally aggregated utilization.

After the strategy has averaged the clients' locally trained phi into phi_bar, this
callback replaces it, per SMoE layer, with

    phi~_i = tanh(u* / (u~_i + eps) - 1),   u* = K_bar / M
    phi    = clip(zeta * phi_bar + (1 - zeta) * phi~, phi_min, phi_max)

so over-used experts get a negative modulation and neglected ones a positive one
(DESIGN.md section 3). The next round's clients route with logits s + kappa * phi.
"""

from __future__ import annotations

from typing import Any

import torch

from ubsmoe.fl.server import mean_active_experts, owning_layer
from ubsmoe.settings import DMRSettings


def dmr_update(
    phi_bar: torch.Tensor,
    utilization: torch.Tensor,
    mean_k: float,
    settings: DMRSettings,
) -> torch.Tensor:
    """The new global phi of one layer from the averaged local phi and the aggregated utilization."""
    num_experts = utilization.numel()
    target = mean_k / num_experts
    phi_target = torch.tanh(target / (utilization.double() + settings.eps) - 1.0)
    mixed = settings.zeta * phi_bar.double() + (1.0 - settings.zeta) * phi_target
    return mixed.clamp(settings.phi_min, settings.phi_max).to(phi_bar.dtype)


class DMRCallback:
    """Applies :func:`dmr_update` to every layer's phi after aggregation (``on_aggregate_end``)."""

    def __init__(self, settings: DMRSettings, phi_names: list[str]) -> None:
        self.settings = settings
        self.phi_names = list(phi_names)

    def on_aggregate_end(self, loop: Any, round_idx: int, updates: list[Any]) -> None:
        if not self.settings.enabled or not self.phi_names:
            return
        server = loop.server
        mean_k = mean_active_experts(updates)
        layers = list(server.utilization)
        for name in self.phi_names:
            layer = owning_layer(name, layers)
            server.global_state[name] = dmr_update(
                server.global_state[name], server.utilization[layer], mean_k[layer], self.settings
            )
