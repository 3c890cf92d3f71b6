"""The DMR server update of phi against a hand-computed example."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from helpers import make_update

from ubsmoe.callbacks.dmr import DMRCallback, dmr_update
from ubsmoe.fl.server import ServerState, aggregate_utilization
from ubsmoe.settings import DMRSettings


def test_dmr_update_matches_hand_computation() -> None:
    settings = DMRSettings(zeta=0.5, phi_min=-1.0, phi_max=1.0, eps=1e-6)
    utilization = torch.tensor([0.5, 0.25, 0.0, 0.25])  # K_bar = 1 over M = 4 experts: target 0.25
    phi_bar = torch.tensor([0.2, -0.4, 0.9, 0.0])
    out = dmr_update(phi_bar, utilization, mean_k=1.0, settings=settings)
    expected = [
        0.5 * 0.2 + 0.5 * math.tanh(0.25 / (0.5 + 1e-6) - 1),  # over-used: pushed down
        0.5 * -0.4 + 0.5 * math.tanh(0.25 / (0.25 + 1e-6) - 1),  # on target: only the average
        min(1.0, 0.5 * 0.9 + 0.5 * math.tanh(0.25 / 1e-6 - 1)),  # neglected: raised, clipped to phi_max
        0.5 * 0.0 + 0.5 * math.tanh(0.25 / (0.25 + 1e-6) - 1),
    ]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=0, atol=1e-6)
    assert out[0] < phi_bar[0] and out[2] > phi_bar[2] - 1e-6


def test_dmr_callback_updates_phi_from_aggregated_clients() -> None:
    layer = "enc.layer.0.moe"
    phi_name = f"{layer}.phi"
    updates = [
        make_update({}, 10, k=1, tokens=10.0, expert_tokens={layer: torch.tensor([10.0, 0.0])}),
        make_update({}, 10, k=2, tokens=30.0, expert_tokens={layer: torch.tensor([30.0, 30.0])}),
    ]
    server = ServerState(0, {phi_name: torch.tensor([0.1, 0.3])})
    server.utilization = aggregate_utilization(updates)  # [40/40, 30/40]
    settings = DMRSettings(zeta=0.25)
    DMRCallback(settings, [phi_name]).on_aggregate_end(SimpleNamespace(server=server), 0, updates)
    k_bar = (10 * 1 + 30 * 2) / 40  # token-weighted K
    target = k_bar / 2
    expected = [
        0.25 * 0.1 + 0.75 * math.tanh(target / (1.0 + 1e-6) - 1),
        0.25 * 0.3 + 0.75 * math.tanh(target / (0.75 + 1e-6) - 1),
    ]
    torch.testing.assert_close(server.global_state[phi_name], torch.tensor(expected), rtol=0, atol=1e-6)


def test_dmr_disabled_leaves_phi_alone() -> None:
    server = ServerState(0, {"l.phi": torch.tensor([0.5, -0.5])})
    server.utilization = {"l": torch.tensor([1.0, 0.0])}
    DMRCallback(DMRSettings(enabled=False), ["l.phi"]).on_aggregate_end(SimpleNamespace(server=server), 0, [])
    torch.testing.assert_close(server.global_state["l.phi"], torch.tensor([0.5, -0.5]))
