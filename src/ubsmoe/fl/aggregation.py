"""One round's server aggregation around the method's strategy: robust selection, robust rule, DP release.

The loop hands the round's good replies here; in order:

1. ``server.aggregator=krum``: Multi-Krum keeps the clients whose flattened updates (state
   minus payload, PG defaults minus the received ones) lie closest to their neighbours;
2. client-level DP (``privacy.dp``): every kept update is clipped as one vector and replaced
   by a copy the strategy averages with equal weights (:meth:`ServerAggregation.privatize`);
3. the strategy aggregates, every mean it takes going through the configured coordinate
   rule (:mod:`ubsmoe.fl.aggregators`);
4. the expert utilization u~ of the round: the clients' token shares as before, or under DP
   the mean of their clipped shares plus noise;
5. under DP, Gaussian noise of std z * C / m on every averaged tensor (global state and PG
   defaults), then the round is composed in the accountant and the clip adapted.

What the copies carry under DP, so that no average the strategies take depends on a client's
data beyond its clipped vector: ``num_examples`` 1 (equal weights instead of n_c), and
telemetry of one token per expert (FLAME's activation-aware expert weights and PG's
count-weighted defaults become equal weights; DMR's K_bar becomes the plain mean of K_c).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ubsmoe.fl.aggregators import aggregating_with, coordinate_rule, multi_krum
from ubsmoe.fl.client import ClientPayload, ClientUpdate
from ubsmoe.fl.server import ServerState, aggregate_utilization
from ubsmoe.privacy.dp import ClientLevelDP

Tensors = dict[str, torch.Tensor]
STATE, PG, UTILIZATION = "state/", "pg/", "utilization/"  # name spaces of a client's one clipped vector


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(dtype=torch.float64)  # on the server device, as every reply is


def update_parts(update: ClientUpdate, payload: ClientPayload) -> Tensors:
    """Everything a client sends, as changes from what it received: one named vector (float64, CPU).

    State and PG defaults minus the payload's (a default the payload lacks counts from zero);
    each layer's expert utilization shares a_i / n minus the uniform share K_c / M.
    """
    parts: Tensors = {}
    for name, tensor in update.state.items():
        if tensor.is_floating_point():
            parts[STATE + name] = _f64(tensor) - _f64(payload.state[name])
    for layer, tensor in update.pg_defaults.items():
        parts[PG + layer] = _f64(tensor) - received_default(payload, layer, tensor)
    for layer in update.telemetry:
        counts = _f64(update.expert_tokens(layer))
        share = counts / max(update.tokens(layer), 1.0)
        parts[UTILIZATION + layer] = share - uniform_share(update, counts.numel())
    return parts


def received_default(payload: ClientPayload, layer: str, like: torch.Tensor) -> torch.Tensor:
    """The PG default output of ``layer`` the client received (zeros if the payload had none), float64."""
    received = payload.pg_defaults.get(layer)
    return torch.zeros(like.shape, dtype=torch.float64, device=like.device) if received is None else _f64(received)


def uniform_share(update: ClientUpdate, num_experts: int) -> float:
    """K_c / M: each expert's token share if the client's router spread its K_c choices evenly."""
    return float(update.spec.k or 0) / max(num_experts, 1)


class ServerAggregation:
    """The configured aggregation rule and, when set, the client-level DP mechanism."""

    def __init__(
        self,
        *,
        aggregator: str = "mean",
        trim_fraction: float = 0.1,
        krum_byzantine: int = 0,
        krum_select: int | None = None,
        dp: ClientLevelDP | None = None,
    ) -> None:
        self.aggregator = aggregator
        self.rule = coordinate_rule(aggregator, trim_fraction)
        self.krum_byzantine = int(krum_byzantine)
        self.krum_select = krum_select
        self.dp = dp
        self._shares: list[Tensors] = []  # DP: each kept client's clipped utilization shares

    def aggregate(
        self, strategy: Any, server: ServerState, updates: list[ClientUpdate], payloads: dict[int, ClientPayload]
    ) -> list[ClientUpdate]:
        """Aggregate the round into ``server`` (state, PG defaults, utilization); return what was averaged."""
        kept = self.select(updates, payloads)
        averaged = [self.privatize(u, payloads[u.spec.client_id]) for u in kept] if self.dp else kept
        with aggregating_with(self.rule):
            strategy.aggregate(server, averaged)
        if self.dp is None:
            server.utilization = aggregate_utilization(averaged)
        else:
            server.utilization = self.noised_utilization(len(averaged))
            self.add_noise(server, len(averaged))
            self.dp.end_round()
        return averaged

    def select(self, updates: list[ClientUpdate], payloads: dict[int, ClientPayload]) -> list[ClientUpdate]:
        """Multi-Krum's choice of clients (all of them for the other aggregators)."""
        if self.aggregator != "krum" or len(updates) < 2:
            return updates
        vectors = [update_parts(u, payloads[u.spec.client_id]) for u in updates]
        flat = torch.stack([torch.cat([v[n].reshape(-1) for n in sorted(v)]) for v in vectors])
        return [updates[i] for i in multi_krum(flat, self.krum_byzantine, self.krum_select)]

    def privatize(self, update: ClientUpdate, payload: ClientPayload) -> ClientUpdate:
        """The copy of ``update`` the strategy averages under DP: clipped changes, equal weights, flat telemetry."""
        assert self.dp is not None
        clipped = self.dp.clip_client(update_parts(update, payload))
        state = dict(update.state)
        for name, tensor in update.state.items():
            if STATE + name in clipped:
                state[name] = (_f64(payload.state[name]) + clipped[STATE + name]).to(tensor.device, tensor.dtype)
        pg_defaults: Tensors = {}
        for layer, tensor in update.pg_defaults.items():
            base = received_default(payload, layer, tensor)
            pg_defaults[layer] = (base + clipped[PG + layer]).to(tensor.device, tensor.dtype)
        telemetry: dict[str, Tensors] = {}
        shares: Tensors = {}
        for layer in update.telemetry:
            tokens = update.expert_tokens(layer)
            num_experts = tokens.numel()
            shares[layer] = uniform_share(update, num_experts) + clipped[UTILIZATION + layer]
            telemetry[layer] = {
                "expert_tokens": torch.ones(num_experts, dtype=torch.float64, device=tokens.device),
                "tokens": torch.tensor(float(num_experts), dtype=torch.float64, device=tokens.device),
            }
        self._shares.append(shares)
        return replace(update, state=state, pg_defaults=pg_defaults, telemetry=telemetry, num_examples=1)

    def noised_utilization(self, count: int) -> Tensors:
        """u~ per layer: the mean of the clipped shares plus the mechanism's noise, clipped at 0."""
        assert self.dp is not None
        shares, self._shares = self._shares, []
        if not shares or not shares[0]:
            return {}
        out: Tensors = {}
        for layer in shares[0]:
            mean = torch.stack([s[layer] for s in shares]).mean(0)
            out[layer] = (mean + self.dp.noise_like(mean, count)).clamp_min(0.0).to(torch.float32)
        return out

    def add_noise(self, server: ServerState, count: int) -> None:
        """Gaussian noise of std z * C / count on every averaged tensor of the global state and PG defaults."""
        server.global_state = self._noised(server.global_state, count)
        server.pg_defaults = self._noised(server.pg_defaults, count)

    def _noised(self, tensors: Tensors, count: int) -> Tensors:
        assert self.dp is not None
        out = dict(tensors)
        for name in sorted(tensors):  # a fixed order: the noise drawn for each tensor is reproducible
            tensor = tensors[name]
            if tensor.is_floating_point():
                noise = self.dp.noise_like(tensor, count).to(tensor.device)
                out[name] = (tensor.to(torch.float64) + noise).to(tensor.dtype)
        return out
