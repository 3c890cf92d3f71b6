"""The DMR server update of phi against a hand-computed example."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import make_update

from ubsmoe.callbacks.dmr import DMRCallback, dmr_update
from ubsmoe.fl.server import ServerState, aggregate_utilization
from ubsmoe.settings import DMRSettings
from ubsmoe.smoe.routing import range_penalty


def test_dmr_update_matches_hand_computation() -> None:
    settings = DMRSettings(zeta=0.5, phi_min=-1.0, phi_max=1.0, eps=1e-6, server_clip=True)
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
    settings = DMRSettings(zeta=0.25, momentum_source="local_mean")  # phi_bar = the strategy's mean
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


def _server(phi: list[float], utilization: list[float]) -> tuple[ServerState, SimpleNamespace]:
    server = ServerState(0, {"l.phi": torch.tensor(phi)})
    server.utilization = {"l": torch.tensor(utilization)}
    return server, SimpleNamespace(server=server)


def test_previous_global_momentum_is_a_plain_ema_of_the_targets() -> None:
    """The paper's reading: phi <- zeta * phi_previous_global + (1 - zeta) * phi~, whatever clients trained."""
    settings = DMRSettings(zeta=0.5)
    assert settings.momentum_source == "previous_global"
    server, loop = _server([0.2, -0.2], [0.75, 0.25])
    callback = DMRCallback(settings, ["l.phi"])
    callback.on_fit_start(loop)
    updates = [make_update({}, 10, k=1, tokens=10.0, expert_tokens={"l": torch.tensor([7.5, 2.5])})]
    server.global_state["l.phi"] = torch.tensor([5.0, 5.0])  # the clients' locally trained phi, averaged
    callback.on_aggregate_end(loop, 0, updates)
    target = [math.tanh(0.5 / (0.75 + 1e-6) - 1), math.tanh(0.5 / (0.25 + 1e-6) - 1)]
    first = [0.5 * 0.2 + 0.5 * target[0], 0.5 * -0.2 + 0.5 * target[1]]
    torch.testing.assert_close(server.global_state["l.phi"], torch.tensor(first), rtol=0, atol=1e-6)
    server.global_state["l.phi"] = torch.tensor([-3.0, 3.0])
    callback.on_aggregate_end(loop, 1, updates)
    second = [0.5 * f + 0.5 * t for f, t in zip(first, target, strict=True)]
    torch.testing.assert_close(server.global_state["l.phi"], torch.tensor(second), rtol=0, atol=1e-6)


def test_previous_global_needs_the_fit_start_snapshot() -> None:
    server, loop = _server([0.0, 0.0], [1.0, 0.0])
    with pytest.raises(RuntimeError, match="on_fit_start"):
        DMRCallback(DMRSettings(), ["l.phi"]).on_aggregate_end(loop, 0, [make_update({}, 1, k=1)])


def _simulate(*, penalty: float, clip: bool, source: str, rounds: int = 30) -> torch.Tensor:
    """Rounds of local phi training under a persistent imbalance, then the server update.

    Expert 1 never gets tokens, so phi~ stays near +1 for it; locally, the task keeps pushing
    its phi up (a constant gradient, as when raising it keeps lowering the loss); the range
    penalty (weight ``penalty``) is the only local force against that.
    """
    settings = DMRSettings(zeta=0.5, phi_min=-0.5, phi_max=0.5, penalty=penalty, server_clip=clip,
                           momentum_source=source)  # fmt: skip
    server, loop = _server([0.0, 0.0], [1.0, 0.0])
    callback = DMRCallback(settings, ["l.phi"])
    callback.on_fit_start(loop)
    update = make_update({}, 10, k=1, tokens=10.0, expert_tokens={"l": torch.tensor([10.0, 0.0])})
    push = torch.tensor([0.0, -1.0])  # d(task loss)/d(phi)
    for r in range(rounds):
        phi = server.global_state["l.phi"].clone().requires_grad_(True)
        for _ in range(10):  # local SGD steps, lr 0.05
            loss = (push * phi).sum() + range_penalty(phi, settings.phi_min, settings.phi_max, settings.penalty)
            (grad,) = torch.autograd.grad(loss, phi)
            phi = (phi - 0.05 * grad).detach().requires_grad_(True)
        server.global_state["l.phi"] = phi.detach()  # the strategy's mean of one client
        callback.on_aggregate_end(loop, r, [update])
    return server.global_state["l.phi"]


@pytest.mark.parametrize("source", ["previous_global", "local_mean"])
def test_without_penalty_and_clip_phi_leaves_its_range_under_persistent_imbalance(source: str) -> None:
    free = _simulate(penalty=0.0, clip=False, source=source)
    assert free[1] > 0.5 + 0.2  # left [phi_min, phi_max] for good
    clipped = _simulate(penalty=0.0, clip=True, source=source)
    assert clipped[1] <= 0.5 + 1e-6
    if source == "local_mean":  # the clients' phi feeds back: the local penalty alone pulls it back
        held = _simulate(penalty=10.0, clip=False, source=source)
        assert held[1] < free[1] - 0.3
