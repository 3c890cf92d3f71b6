"""Aggregation invariants of the strategies, on hand-made client updates."""

from __future__ import annotations

import torch
from helpers import make_update

from ubsmoe.fl.server import ServerState, aggregate_utilization
from ubsmoe.fl.strategies import FedAvg, SparseMoEStrategy


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.layer.0.ffn.lora_A": torch.randn(4, 2, 3, generator=g),  # leading dim = expert
        "enc.layer.0.ffn.phi": torch.randn(4, generator=g),
        "head.weight": torch.randn(2, 3, generator=g),
    }


def test_fedavg_of_identical_clients_returns_that_client() -> None:
    state = _state(0)
    server = ServerState(round=0, global_state=_state(1))
    FedAvg().aggregate(server, [make_update(dict(state), n) for n in (3, 50, 7)])
    for name, value in state.items():
        torch.testing.assert_close(server.global_state[name], value, rtol=0, atol=1e-7)


def test_fedavg_weights_follow_example_counts() -> None:
    a, b = _state(0), _state(1)
    server = ServerState(round=0, global_state=_state(2))
    FedAvg().aggregate(server, [make_update(a, 30), make_update(b, 10)])
    for name in a:
        torch.testing.assert_close(server.global_state[name], 0.75 * a[name] + 0.25 * b[name])


def test_sparse_strategy_with_t0_is_fedavg_and_t1_follows_activation() -> None:
    a, b = _state(0), _state(1)
    layer = "enc.layer.0.ffn"
    counts_a = torch.tensor([10.0, 0.0, 5.0, 5.0])
    counts_b = torch.tensor([0.0, 10.0, 5.0, 5.0])
    updates = [
        make_update(a, 30, expert_tokens={layer: counts_a}, tokens=10.0),
        make_update(b, 10, expert_tokens={layer: counts_b}, tokens=10.0),
    ]
    expert_names = ["enc.layer.0.ffn.lora_A"]
    fedavg, flame0 = ServerState(0, _state(2)), ServerState(0, _state(2))
    FedAvg().aggregate(fedavg, updates)
    SparseMoEStrategy(expert_names, exponent=0.0).aggregate(flame0, updates)
    for name in a:
        torch.testing.assert_close(flame0.global_state[name], fedavg.global_state[name])

    flame1 = ServerState(0, _state(2))
    SparseMoEStrategy(expert_names, exponent=1.0).aggregate(flame1, updates)
    merged = flame1.global_state["enc.layer.0.ffn.lora_A"]
    torch.testing.assert_close(merged[0], a["enc.layer.0.ffn.lora_A"][0])  # only client a used expert 0
    torch.testing.assert_close(merged[1], b["enc.layer.0.ffn.lora_A"][1])  # only client b used expert 1
    torch.testing.assert_close(merged[2], 0.75 * a["enc.layer.0.ffn.lora_A"][2] + 0.25 * b["enc.layer.0.ffn.lora_A"][2])
    # shared tensors stay example-weighted
    torch.testing.assert_close(flame1.global_state["head.weight"], fedavg.global_state["head.weight"])


def test_pg_defaults_are_activation_weighted_and_unused_experts_keep_theirs() -> None:
    layer = "enc.layer.0.ffn"
    d_a, d_b = torch.full((3, 2), 1.0), torch.full((3, 2), 4.0)
    previous = {layer: torch.full((3, 2), -7.0)}
    updates = [
        make_update(_state(0), 10, expert_tokens={layer: torch.tensor([3.0, 0.0, 0.0])}, pg_defaults={layer: d_a}),
        make_update(_state(1), 10, expert_tokens={layer: torch.tensor([1.0, 2.0, 0.0])}, pg_defaults={layer: d_b}),
    ]
    out = SparseMoEStrategy.aggregate_pg_defaults(previous, updates)[layer]
    torch.testing.assert_close(out[0], torch.full((2,), 0.75 * 1.0 + 0.25 * 4.0))
    torch.testing.assert_close(out[1], torch.full((2,), 4.0))
    torch.testing.assert_close(out[2], torch.full((2,), -7.0))


def test_utilization_is_token_weighted() -> None:
    layer = "l0"
    updates = [
        make_update({}, 1, expert_tokens={layer: torch.tensor([20.0, 0.0, 0.0, 0.0])}, tokens=10.0, k=2),
        make_update({}, 1, expert_tokens={layer: torch.tensor([0.0, 30.0, 30.0, 30.0])}, tokens=30.0, k=3),
    ]
    u = aggregate_utilization(updates)[layer]
    torch.testing.assert_close(u, torch.tensor([20.0, 30.0, 30.0, 30.0]) / 40.0)


def test_flame_tier_scale_is_averaged_over_its_own_tiers_clients() -> None:
    """FLAME's per-tier scale after one round = the n_c-weighted mean over that tier's clients only."""
    from dataclasses import replace

    name = "backbone.encoder.layer.0.intermediate.tier_scale"
    server = ServerState(0, {name: torch.ones(3)})
    trained = {0: [1.4, 1.6], 1: [0.5]}  # tier -> the scale each of its clients trained
    updates = []
    for tier, values in trained.items():
        for value, n in zip(values, (10, 30), strict=False):
            scale = torch.ones(3)
            scale[tier] = value  # a client trains only its own tier's entry
            update = make_update({name: scale}, n)
            update.spec = replace(update.spec, tier_index=tier)
            updates.append(update)
    SparseMoEStrategy([], exponent=2.0).aggregate(server, updates)
    got = server.global_state[name]
    torch.testing.assert_close(got[0], torch.tensor(0.25 * 1.4 + 0.75 * 1.6))
    torch.testing.assert_close(got[1], torch.tensor(0.5))
    torch.testing.assert_close(got[2], torch.tensor(1.0))  # no client of tier 2 this round


def test_flame_defaults_to_t_2() -> None:
    from helpers import compose_config

    assert compose_config("method=flame").method.expert_agg_exponent == 2.0
