"""The paper's baselines: per-rank LoRA scaling, FedIT's rank switch, FLoRA's downlink and init, FLoRIST."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from helpers import compose_config, make_update
from torch import nn

from ubsmoe.callbacks.metrics_writer import MetricsWriter
from ubsmoe.settings import Tier, method_settings
from ubsmoe.validate import validate
from ubsmoe.fl.client import ClientSpec, ClientUpdate, make_tier_specs
from ubsmoe.fl.server import ServerState
from ubsmoe.names import METHODS
from ubsmoe.fl.strategies import STRATEGIES, build_strategy, FedAvg, FedIT, FlexLoRA, FLoRA, FLoRIST, StrategyContext
from ubsmoe.fl.strategies.florist import energy_rank, stacked_svd, threshold_update
from ubsmoe.fl.strategies.flora import stack
from ubsmoe.fl.summary import RoundSummary
from ubsmoe.smoe.lora import RankLimiter, inject_peft_lora, peft_lora_layers, set_peft_scaling

R, IN, OUT = 4, 7, 5
PREFIX = "enc.layer.0.attention.self.query"
A_NAME = f"{PREFIX}.lora_A.default.weight"
B_NAME = f"{PREFIX}.lora_B.default.weight"
HEAD = "head.weight"
TIERS = [Tier("t25", 0.25, 0.25), Tier("t50", 0.5, 0.25), Tier("t75", 0.75, 0.25), Tier("t100", 1.0, 0.25)]


def _state(seed: int, *, rank: int = R, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(R, IN, generator=g, dtype=dtype)
    b = torch.randn(OUT, R, generator=g, dtype=dtype)
    a[rank:] = 0
    b[:, rank:] = 0
    return {A_NAME: a, B_NAME: b, HEAD: torch.randn(2, 3, generator=g, dtype=dtype)}


def _update(state: dict[str, torch.Tensor], n: int, rank: int | None, client_id: int = 0, tier: int = 0) -> ClientUpdate:
    update = make_update(state, n, k=None, client_id=client_id)
    update.spec = replace(update.spec, rank=rank, tier_index=tier)
    return update


def _spec(rank: int | None, client_id: int = 0) -> ClientSpec:
    return replace(make_update({}, 1, k=None).spec, rank=rank, client_id=client_id)


def _product(state: dict[str, torch.Tensor], rank: int = R) -> torch.Tensor:
    return state[B_NAME][:, :rank].double() @ state[A_NAME][:rank].double()


# --- per-rank LoRA scaling ------------------------------------------------------------------------


def test_per_rank_scaling_equals_a_standalone_peft_lora_of_rank_rc() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    alpha, rank_c = 16.0, 2
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(IN, OUT)
    ours = nn.Sequential()
    ours.add_module("proj", nn.Linear(IN, OUT))
    ours.proj.load_state_dict(base.state_dict())
    tensors = inject_peft_lora(ours, ["proj"], rank=R, alpha=alpha, dropout=0.0, generator=g)
    with torch.no_grad():
        ours.proj.lora_B["default"].weight.normal_(generator=g)
    limiter = RankLimiter(tensors, R)
    limiter.set_rank(rank_c)
    set_peft_scaling(peft_lora_layers(ours), alpha / rank_c)

    alone = nn.Sequential()
    alone.add_module("proj", nn.Linear(IN, OUT))
    alone.proj.load_state_dict(base.state_dict())
    inject_adapter_in_model(LoraConfig(r=rank_c, lora_alpha=alpha, target_modules=["proj"]), alone)
    with torch.no_grad():
        alone.proj.lora_A["default"].weight.copy_(ours.proj.lora_A["default"].weight[:rank_c])
        alone.proj.lora_B["default"].weight.copy_(ours.proj.lora_B["default"].weight[:, :rank_c])
    x = torch.randn(6, IN, generator=g)
    torch.testing.assert_close(ours(x), alone(x))
    set_peft_scaling(peft_lora_layers(ours), alpha / R)  # max_rank: alpha / r, a smaller output
    assert not torch.allclose(ours(x), alone(x))


def test_model_applies_the_per_rank_scaling_of_the_client_rank() -> None:
    from helpers import build

    from ubsmoe.settings import MethodSettings

    model = build(sparse=False, method=MethodSettings(sparse=False, hetero_rank=True, lora_scaling="per_rank"))
    alpha, full = model.model_settings.lora.alpha, model.model_settings.lora.rank
    model.set_client(rank=2)
    assert {layer.scaling["default"] for layer in model._peft_layers} == {alpha / 2}
    model.method.lora_scaling = "max_rank"
    model.set_client(rank=2)
    assert {layer.scaling["default"] for layer in model._peft_layers} == {alpha / full}


def test_flexlora_per_rank_aggregates_and_hands_out_in_each_clients_scaling() -> None:
    alpha = 16.0
    scaling = alpha / R
    clients = [_state(1, rank=2), _state(2, rank=R)]
    server = ServerState(round=0, global_state=_state(3))
    strategy = FlexLoRA(scaling=scaling, lora_scaling="per_rank")
    strategy.aggregate(server, [_update(clients[0], 10, rank=2, client_id=0), _update(clients[1], 30, rank=None, client_id=1)])
    expected = 0.25 * (alpha / 2) * _product(clients[0], 2) + 0.75 * (alpha / R) * _product(clients[1])
    for rank in (2, R):
        payload = strategy.configure_client(server, _spec(rank))
        handed = (alpha / rank) * (payload.state[B_NAME].double() @ payload.state[A_NAME].double())
        u, s, vh = torch.linalg.svd(expected)
        torch.testing.assert_close(handed, u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank])


def test_lora_scaling_defaults_follow_each_reference() -> None:
    expected = {"flexlora": "per_rank", "flora": "constant", "florist": "constant", "hetlora": "max_rank",
                "fedit": "max_rank", "ubsmoe": "max_rank"}  # fmt: skip
    for method, mode in expected.items():
        assert compose_config(f"method={method}").method.lora_scaling == mode


@pytest.mark.parametrize("name", ["flora", "florist"])
def test_flora_and_florist_clients_scale_by_two_at_every_rank_as_their_reference(name: str) -> None:
    """FederatedLLM's and FLoRIST's main.py build each client's peft LoRA with lora_alpha = 2 * r_c.

    alpha / r = 4 here, so the reference's scaling 2 differs from both max_rank (4) and
    per_rank (alpha / r_c = 8 at r_c = 2).
    """
    from helpers import build

    from ubsmoe.settings import LoraSettings, ModelSettings

    method = method_settings(compose_config(f"method={name}"))
    alpha, full = 16.0, R
    model = build(sparse=False, model=ModelSettings(dropout=0.0, lora=LoraSettings(rank=full, alpha=alpha)), method=method)
    for rank_c in (2, full):
        model.set_client(rank=rank_c)
        assert {layer.scaling["default"] for layer in model._peft_layers} == {2 * rank_c / rank_c}

    strategy = build_strategy(method, StrategyContext(expert_tensor_names=[], lora_scaling=alpha / full, seed=0))
    if isinstance(strategy, FLoRIST):
        strategy.tau = 1.0  # the whole stack: its update is then FLoRA's exact sum
    clients = [_state(21, rank=2), _state(22, rank=full)]
    server = ServerState(round=0, global_state=_state(23))
    strategy.aggregate(server, [_update(clients[0], 25, rank=2, client_id=0), _update(clients[1], 75, rank=None, client_id=1)])
    exact = 0.25 * 2.0 * _product(clients[0], 2) + 0.75 * 2.0 * _product(clients[1])
    torch.testing.assert_close(strategy.merged[PREFIX].double(), exact, rtol=1e-10, atol=1e-10)


# --- FedIT ----------------------------------------------------------------------------------------


def test_fedit_trains_full_rank_or_the_smallest_tiers_rank() -> None:
    full = make_tier_specs(TIERS, sparse=False, hetero_rank=False, num_experts=8, max_rank=8)
    assert [s.rank for s in full] == [None] * 4
    smallest = make_tier_specs(TIERS, sparse=False, hetero_rank=False, num_experts=8, max_rank=8, homogeneous_rank="smallest")
    assert [s.rank for s in smallest] == [2] * 4
    strategy = FedIT()
    server = ServerState(round=0, global_state=_state(4))
    payload = strategy.configure_client(server, _spec(2))
    assert strategy.payload_bytes(payload, _spec(2)) == server.global_state[HEAD].numel() * 8 + 2 * (IN + OUT) * 8
    assert torch.count_nonzero(payload.state[A_NAME][2:]) == 0


def test_fedit_at_full_rank_is_fedavg() -> None:
    updates = [_update(_state(5), 10, None, 0), _update(_state(6), 30, None, 1)]
    a, b = ServerState(0, _state(7)), ServerState(0, _state(7))
    FedIT().aggregate(a, updates)
    FedAvg().aggregate(b, updates)
    for name, value in b.global_state.items():
        torch.testing.assert_close(a.global_state[name], value, rtol=0, atol=1e-15)


# --- FLoRA ----------------------------------------------------------------------------------------


def _flora_round(strategy: FLoRA, server: ServerState) -> list[ClientUpdate]:
    updates = [
        _update(_state(8, rank=2, dtype=torch.float32), 25, rank=2, client_id=0, tier=0),
        _update(_state(9, dtype=torch.float32), 75, rank=None, client_id=5, tier=3),
    ]
    strategy.aggregate(server, updates)
    return updates


def test_flora_downlink_is_every_client_times_the_stack_per_round() -> None:
    strategy = FLoRA(scaling=1.0, seed=0)
    server = ServerState(round=0, global_state=_state(10, dtype=torch.float32))
    updates = _flora_round(strategy, server)
    stack_bytes = (2 + R) * (IN + OUT) * 4
    assert strategy.broadcast_bytes(server) == stack_bytes
    for u in updates:
        u.bytes_received = 100  # the sampled clients' own payloads
    num_clients = 20
    specs = [replace(_spec(None, cid), tier_index=cid % 4) for cid in range(num_clients)]
    loop = SimpleNamespace(specs=specs, tiers=TIERS, tier_spec=lambda t: specs[t], tier_flops=lambda t: 1.0,
                           dense_flops_per_example=1.0)  # fmt: skip
    summary = RoundSummary(round=1, client_ids=[0, 5], updates=updates, evaluation=None, utilization={}, phi={},
                           wall_time=0.0, round_seconds=0.0, train_eval_seconds=0.0,
                           broadcast_bytes=strategy.broadcast_bytes(server))  # fmt: skip
    records = MetricsWriter("/nonexistent", method="flora", task="sst2", seed=0).tier_records(loop, summary)
    assert sum(r["bytes_sent"] for r in records) == num_clients * stack_bytes + 2 * 100
    assert [r["bytes_sent"] for r in records] == [5 * stack_bytes + 100, 5 * stack_bytes, 5 * stack_bytes, 5 * stack_bytes + 100]


def test_flora_fresh_adapters_independent_per_client_or_shared() -> None:
    server = ServerState(round=3, global_state=_state(11, dtype=torch.float32))
    independent = FLoRA(scaling=1.0, seed=0, init="independent")
    a0 = independent.configure_client(server, _spec(None, 0)).state[A_NAME]
    a1 = independent.configure_client(server, _spec(None, 1)).state[A_NAME]
    again = independent.configure_client(server, _spec(None, 0)).state[A_NAME]
    assert not torch.equal(a0, a1) and torch.equal(a0, again)
    assert float(a0.abs().max()) <= IN**-0.5
    assert torch.count_nonzero(independent.configure_client(server, _spec(None, 1)).state[B_NAME]) == 0
    shared = FLoRA(scaling=1.0, seed=0, init="shared")
    s0 = shared.configure_client(server, _spec(None, 0)).state[A_NAME]
    s1 = shared.configure_client(server, _spec(None, 1)).state[A_NAME]
    assert torch.equal(s0, s1) and torch.equal(s0, server.global_state[A_NAME])
    assert compose_config("method=flora").method.flora_init == "independent"


# --- FLoRIST --------------------------------------------------------------------------------------


def _pairs(seed: int, ranks=(2, 3, 4), m: int = 9, n: int = 11) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(m, r, generator=g, dtype=torch.float64))
            for r in ranks]  # fmt: skip


def test_florist_core_svd_equals_the_svd_of_the_full_product() -> None:
    pairs = _pairs(0)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    a_st, b_st = stack(pairs, weights)
    full = b_st @ a_st
    u_g, s, vh_g = stacked_svd(a_st, b_st)
    reference = torch.linalg.svdvals(full)
    q = min(s.numel(), reference.numel())
    torch.testing.assert_close(s[:q], reference[:q], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u_g @ torch.diag(s) @ vh_g, full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u_g.t() @ u_g, torch.eye(s.numel(), dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(vh_g @ vh_g.t(), torch.eye(s.numel(), dtype=torch.float64), rtol=0, atol=1e-10)
    u, sv, vh = torch.linalg.svd(full)
    for k in (1, 3, 5):  # every truncation is the best rank-k approximation (Eckart-Young)
        torch.testing.assert_close(u_g[:, :k] @ torch.diag(s[:k]) @ vh_g[:k], u[:, :k] @ torch.diag(sv[:k]) @ vh[:k])


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.9, 0.99])
def test_florist_keeps_at_least_tau_of_the_energy_with_the_fewest_directions(tau: float) -> None:
    pairs = _pairs(1)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    a_g, b_g = threshold_update(pairs, weights, tau)
    k = a_g.shape[0]
    _, s, _ = stacked_svd(*stack(pairs, weights))
    energy = s.square()
    assert energy[:k].sum() >= tau * energy.sum() - 1e-12
    assert energy[: k - 1].sum() < tau * energy.sum()
    assert energy_rank(s, tau) == k
    kept = torch.linalg.matrix_norm(b_g @ a_g).square()
    torch.testing.assert_close(kept, energy[:k].sum())


def test_florist_tau_one_is_exact_and_identical_clients_give_that_clients_product() -> None:
    pairs = _pairs(2)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    a_g, b_g = threshold_update(pairs, weights, 1.0)
    exact = sum(float(w) * (b @ a) for (a, b), w in zip(pairs, weights, strict=True))
    torch.testing.assert_close(b_g @ a_g, exact, rtol=1e-10, atol=1e-10)
    one = _pairs(3, ranks=(3,))[0]
    a_g, b_g = threshold_update([one, one, one], weights, 1.0)
    torch.testing.assert_close(b_g @ a_g, one[1] @ one[0], rtol=1e-10, atol=1e-10)
    assert a_g.shape[0] <= 3  # never more directions than the client's rank
    a_g, b_g = threshold_update([one, one], torch.tensor([0.5, 0.5], dtype=torch.float64), 0.9)
    u, s, vh = torch.linalg.svd(one[1] @ one[0])
    k = a_g.shape[0]
    torch.testing.assert_close(b_g @ a_g, u[:, :k] @ torch.diag(s[:k]) @ vh[:k], rtol=1e-10, atol=1e-10)


def test_florist_strategy_merges_the_thresholded_update_and_counts_its_bytes() -> None:
    alpha = 16.0
    strategy = FLoRIST(scaling=alpha / R, seed=0, tau=1.0, lora_scaling="per_rank")
    server = ServerState(round=0, global_state=_state(12))
    clients = [_state(13, rank=2), _state(14, rank=R)]
    updates = [_update(clients[0], 25, rank=2, client_id=0), _update(clients[1], 75, rank=None, client_id=1)]
    strategy.aggregate(server, updates)
    # per-rank scaling folded into each B_c: sum_c p_c (alpha / r_c) B_c A_c
    exact = 0.25 * (alpha / 2) * _product(clients[0], 2) + 0.75 * (alpha / R) * _product(clients[1])
    torch.testing.assert_close(strategy.merged[PREFIX].double(), exact, rtol=1e-10, atol=1e-10)
    k = strategy.stack_ranks[PREFIX]
    assert k <= 2 + R
    assert strategy.broadcast_bytes(server) == k * (IN + OUT) * 8  # downlink k* (m + n) to every client
    assert strategy.update_bytes(updates[0]) == 2 * (IN + OUT) * 8 + clients[0][HEAD].numel() * 8  # uplink r_c (m + n)
    assert torch.count_nonzero(server.global_state[B_NAME]) == 0  # clients restart from fresh adapters


def test_florist_is_a_registered_method_in_compare_and_the_sweep() -> None:
    from pathlib import Path

    assert "florist" in METHODS
    cfg = compose_config("method=florist")
    validate(cfg)
    method = method_settings(cfg)
    strategy = build_strategy(method, StrategyContext(expert_tensor_names=[], lora_scaling=2.0, seed=0))
    assert isinstance(strategy, FLoRIST) and strategy.tau == 0.9 and strategy.lora_scaling_mode == "constant"
    sweep = (Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "methods.yaml").read_text()
    assert "florist" in sweep
