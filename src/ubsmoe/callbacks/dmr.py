"""Dynamic Modulated Routing: the server update of phi from globally aggregated utilization.

After the strategy has averaged the round's clients, this callback sets, per SMoE layer,

    phi~_i = tanh(u* / (u~_i + eps) - 1),   u* = K_bar / M
    phi    = zeta * source + (1 - zeta) * phi~          (then clipped to [phi_min, phi_max])

so over-used experts get a negative modulation and neglected ones a positive one
(docs/paper.md). Two readings of "updated with momentum zeta", a switch
(``method.dmr.momentum_source``):

- ``previous_global`` (default, the paper's reading): ``source`` = the global phi of the
  previous round, a plain exponential moving average of the server targets. The clients'
  locally trained phi (range-penalised) shapes their own routing during the round only.
- ``local_mean``: ``source`` = phi_bar, the example-weighted mean of the clients' locally
  trained phi (the project's first design): local training of phi feeds back into the global.

``method.dmr.server_clip`` (off by default: the paper bounds phi only through the local range
penalty) clips the server's phi to [phi_min, phi_max]. Under ``previous_global`` the server phi
is an average of tanh values and stays inside (-1, 1) anyway, so the clip matters only for a
narrower range or for ``local_mean``, where the clients' drift feeds back; with the local
penalty off and no clip, phi then leaves [phi_min, phi_max] (the paper's divergence ablation).
The next round's clients route with logits s + kappa * phi (kappa = 1 in the paper).
"""

from __future__ import annotations

from typing import Any

import torch

from ubsmoe.fl.server import mean_active_experts, owning_layer
from ubsmoe.settings import DMRSettings


def dmr_target(utilization: torch.Tensor, mean_k: float, eps: float) -> torch.Tensor:
    """phi~ = tanh(u* / (u~ + eps) - 1) with u* = K_bar / M, in float64."""
    target = mean_k / utilization.numel()
    return torch.tanh(target / (utilization.double() + eps) - 1.0)


def dmr_update(
    source: torch.Tensor,
    utilization: torch.Tensor,
    mean_k: float,
    settings: DMRSettings,
) -> torch.Tensor:
    """The new global phi of one layer: ``zeta * source + (1 - zeta) * phi~``, clipped if ``server_clip``.

    ``source`` is the previous global phi or the clients' mean phi (``settings.momentum_source``).
    """
    mixed = settings.zeta * source.double() + (1.0 - settings.zeta) * dmr_target(utilization, mean_k, settings.eps)
    if settings.server_clip:
        mixed = mixed.clamp(settings.phi_min, settings.phi_max)
    return mixed.to(source.dtype)


class DMRCallback:
    """Applies :func:`dmr_update` to every layer's phi after aggregation (``on_aggregate_end``).

    With ``momentum_source=previous_global`` it remembers the global phi it last wrote; at
    ``on_fit_start`` it reads it from the server state (which holds exactly that after a
    resume), so it needs no checkpoint state of its own.
    """

    def __init__(self, settings: DMRSettings, phi_names: list[str]) -> None:
        if settings.momentum_source not in ("previous_global", "local_mean"):
            raise ValueError(f"momentum_source={settings.momentum_source!r}: previous_global or local_mean")
        self.settings = settings
        self.phi_names = list(phi_names)
        self.previous: dict[str, torch.Tensor] = {}

    def on_fit_start(self, loop: Any) -> None:
        self.previous = {name: loop.server.global_state[name].detach().clone() for name in self.phi_names}

    def on_aggregate_end(self, loop: Any, round_idx: int, updates: list[Any]) -> None:
        if not self.settings.enabled or not self.phi_names:
            return
        server = loop.server
        mean_k = mean_active_experts(updates)
        layers = list(server.utilization)
        for name in self.phi_names:
            layer = owning_layer(name, layers)
            if self.settings.momentum_source == "previous_global":
                if name not in self.previous:
                    raise RuntimeError("DMRCallback.on_fit_start must run before the first aggregation")
                source = self.previous[name]
            else:
                source = server.global_state[name]
            new = dmr_update(source, server.utilization[layer], mean_k[layer], self.settings)
            server.global_state[name] = new
            self.previous[name] = new.detach().clone()
