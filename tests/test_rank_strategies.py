"""The heterogeneous-rank baselines (HetLoRA, FlexLoRA, FLoRA) on hand-made LoRA pairs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import make_update

from ubsmoe.fl.client import ClientSpec, ClientUpdate
from ubsmoe.fl.server import ServerState
from ubsmoe.fl.strategies.flexlora import FlexLoRA
from ubsmoe.fl.strategies.flora import FLoRA, base_delta_name, stack
from ubsmoe.fl.strategies.hetlora import HetLoRA, prune_rank, self_pruning_penalty, self_pruning_penalty_over
from ubsmoe.fl.strategies.lora_pairs import find_lora_pairs, leading_pair, pad_pair, truncate_pair

R, IN, OUT = 4, 7, 5
PREFIX = "enc.layer.0.attention.self.query"
A_NAME = f"{PREFIX}.lora_A.default.weight"
B_NAME = f"{PREFIX}.lora_B.default.weight"
HEAD = "head.weight"


def _state(seed: int, *, rank: int = R, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A LoRA pair of module rank R whose components beyond ``rank`` are zero, plus a head."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(R, IN, generator=g, dtype=dtype)
    b = torch.randn(OUT, R, generator=g, dtype=dtype)
    a[rank:] = 0
    b[:, rank:] = 0
    return {A_NAME: a, B_NAME: b, HEAD: torch.randn(2, 3, generator=g, dtype=dtype)}


def _update(state: dict[str, torch.Tensor], n: int, rank: int | None, client_id: int = 0) -> ClientUpdate:
    update = make_update(state, n, k=None, client_id=client_id)
    update.spec = replace(update.spec, rank=rank)
    return update


def _spec(rank: int | None, client_id: int = 0) -> ClientSpec:
    return replace(make_update({}, 1, k=None).spec, rank=rank, client_id=client_id)


def _product(state: dict[str, torch.Tensor], rank: int = R) -> torch.Tensor:
    return state[B_NAME][:, :rank].double() @ state[A_NAME][:rank].double()


def _best_rank_approx(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank], s


# --- finding the pairs -------------------------------------------------------------------------


def test_find_lora_pairs_matches_peft_names_any_adapter_and_bare_form() -> None:
    names = [
        A_NAME,
        B_NAME,
        "enc.layer.0.attention.self.value.lora_A.client7.weight",
        "enc.layer.0.attention.self.value.lora_B.client7.weight",
        "dense.lora_A.weight",
        "dense.lora_B.weight",
        "enc.layer.0.ffn.lora_A1",  # stacked expert adapters are not pairs
        "enc.layer.0.ffn.lora_B1",
        HEAD,
    ]
    pairs = find_lora_pairs(names)
    assert pairs == {
        PREFIX: (A_NAME, B_NAME),
        "enc.layer.0.attention.self.value": (
            "enc.layer.0.attention.self.value.lora_A.client7.weight",
            "enc.layer.0.attention.self.value.lora_B.client7.weight",
        ),
        "dense": ("dense.lora_A.weight", "dense.lora_B.weight"),
    }
    with pytest.raises(ValueError, match="not both"):
        find_lora_pairs([A_NAME, HEAD])


def test_truncating_equals_cutting_then_zero_padding() -> None:
    state = _state(31)
    a, b = state[A_NAME], state[B_NAME]
    truncated = truncate_pair(a, b, 2)
    padded = pad_pair(*leading_pair(a, b, 2), R)
    for x, y in zip(truncated, padded):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(truncated[1] @ truncated[0], _product(state, 2))
    with pytest.raises(ValueError):
        truncate_pair(a, b, R + 1)


# --- HetLoRA -----------------------------------------------------------------------------------


def test_hetlora_configure_client_keeps_leading_ranks_and_leaves_the_server_alone() -> None:
    global_state = _state(0)
    before = {k: v.clone() for k, v in global_state.items()}
    server = ServerState(round=0, global_state=global_state)
    payload = HetLoRA().configure_client(server, _spec(rank=2))
    a, b = payload.state[A_NAME], payload.state[B_NAME]
    assert a.shape == (R, IN) and b.shape == (OUT, R)
    torch.testing.assert_close(a[:2], before[A_NAME][:2], rtol=0, atol=0)
    torch.testing.assert_close(b[:, :2], before[B_NAME][:, :2], rtol=0, atol=0)
    assert torch.count_nonzero(a[2:]) == 0 and torch.count_nonzero(b[:, 2:]) == 0
    torch.testing.assert_close(payload.state[HEAD], before[HEAD], rtol=0, atol=0)
    for name, value in before.items():  # the global tensors were not touched
        torch.testing.assert_close(server.global_state[name], value, rtol=0, atol=0)
    full = HetLoRA().configure_client(server, _spec(rank=None))
    torch.testing.assert_close(full.state[A_NAME], before[A_NAME], rtol=0, atol=0)


def test_hetlora_zero_pads_and_weights_clients_by_the_norm_of_their_update() -> None:
    small, large = _state(1, rank=2), _state(2, rank=R)
    small[A_NAME][2:] = 99.0  # junk beyond the client's rank must be cut, not aggregated
    small[B_NAME][:, 2:] = -99.0
    server = ServerState(round=0, global_state=_state(3))
    HetLoRA().aggregate(server, [_update(small, 10, rank=2, client_id=0), _update(large, 30, rank=None, client_id=1)])

    norms = torch.stack([torch.linalg.matrix_norm(_product(small, 2)), torch.linalg.matrix_norm(_product(large))])
    p = norms / norms.sum()  # the paper's weights: ||B_c A_c||_F / Z, no example counts
    a, b = server.global_state[A_NAME], server.global_state[B_NAME]
    # ranks 2..3: only the rank-R client contributes; its components survive, scaled by its weight
    torch.testing.assert_close(a[2:], p[1] * large[A_NAME][2:])
    torch.testing.assert_close(b[:, 2:], p[1] * large[B_NAME][:, 2:])
    # ranks 0..1: both clients, sparsity-weighted
    torch.testing.assert_close(a[:2], p[0] * small[A_NAME][:2] + p[1] * large[A_NAME][:2])
    torch.testing.assert_close(b[:, :2], p[0] * small[B_NAME][:, :2] + p[1] * large[B_NAME][:, :2])
    # the head stays example-weighted
    torch.testing.assert_close(server.global_state[HEAD], 0.25 * small[HEAD] + 0.75 * large[HEAD])


def test_hetlora_of_identical_clients_returns_that_client() -> None:
    state = _state(4)
    server = ServerState(round=0, global_state=_state(5))
    HetLoRA().aggregate(server, [_update(dict(state), n, rank=None, client_id=i) for i, n in enumerate((3, 40, 7))])
    for name, value in state.items():
        torch.testing.assert_close(server.global_state[name], value)


def test_self_pruning_penalty_is_zero_without_a_tail_and_grows_with_it() -> None:
    state = _state(6)
    a, b = state[A_NAME].clone(), state[B_NAME].clone()
    gamma = 0.5  # rank 4 -> tail components 2, 3
    a[2:], b[:, 2:] = 0, 0
    assert float(self_pruning_penalty(a, b, R, gamma)) == 0.0
    assert float(self_pruning_penalty(state[A_NAME], state[B_NAME], 1, gamma)) == 0.0  # rank 1 has no tail
    a[2:], b[:, 2:] = state[A_NAME][2:], state[B_NAME][:, 2:]
    base = self_pruning_penalty(a, b, R, gamma)
    expected = torch.linalg.matrix_norm(a[2:]) * torch.linalg.matrix_norm(b[:, 2:])
    torch.testing.assert_close(base, expected)
    b_more = b.clone()
    b_more[:, 2:] *= 3.0
    torch.testing.assert_close(self_pruning_penalty(a, b_more, R, gamma, strength=0.1), 0.1 * 3.0 * expected)
    # differentiable, with a finite gradient even where B's tail is still zero
    a_leaf, b_leaf = a.clone().requires_grad_(), torch.zeros_like(b).requires_grad_()
    self_pruning_penalty(a_leaf, b_leaf, R, gamma).backward()
    assert torch.isfinite(a_leaf.grad).all() and torch.isfinite(b_leaf.grad).all()
    total = self_pruning_penalty_over(state, R, gamma)
    torch.testing.assert_close(total, self_pruning_penalty(state[A_NAME], state[B_NAME], R, gamma))


def test_prune_rank_drops_a_zero_tail_and_keeps_a_live_one() -> None:
    state = _state(7)
    a, b = state[A_NAME].clone(), state[B_NAME].clone()
    assert prune_rank(a, b, R, 0.5) == R  # a live tail, nothing to compare with: keep
    b[:, 2:] = 0
    # no "negligible tail" rule (not in the paper): without a reference nothing is pruned
    assert prune_rank(a, b, R, 0.5) == R
    assert prune_rank(a, b, R, 0.5, reference=1e-3) == 2
    assert prune_rank(a, b, R, 0.75, reference=1e-3) == 3
    live_tail = float(self_pruning_penalty(state[A_NAME], state[B_NAME], R, 0.5))
    assert prune_rank(state[A_NAME], state[B_NAME], R, 0.5, reference=2 * live_tail) == 2  # it shrank
    assert prune_rank(state[A_NAME], state[B_NAME], R, 0.5, reference=0.5 * live_tail) == R  # it grew


def test_hetlora_remembers_a_pruned_rank_and_counts_only_the_ranks_it_sends() -> None:
    sent = _state(8)
    sent[B_NAME][:, 2:] *= 0.01  # the tail the clients received was small ...
    server = ServerState(round=0, global_state=sent)
    pruned = _state(9, rank=2)  # ... client 3's came back empty, client 4's grew
    strategy = HetLoRA(gamma=0.5)
    updates = [_update(pruned, 10, rank=None, client_id=3), _update(_state(10), 10, rank=None, client_id=4)]
    strategy.aggregate(server, updates)
    assert strategy.client_rank(_spec(None, client_id=3)) == 2
    assert strategy.client_rank(_spec(None, client_id=4)) is None
    payload = strategy.configure_client(server, _spec(None, client_id=3))
    assert torch.count_nonzero(payload.state[A_NAME][2:]) == 0
    head_bytes = server.global_state[HEAD].numel() * 8
    assert strategy.payload_bytes(payload, _spec(None, client_id=3)) == head_bytes + 2 * (IN + OUT) * 8
    assert strategy.payload_bytes(payload, _spec(None, client_id=4)) == head_bytes + R * (IN + OUT) * 8
    resumed = HetLoRA(gamma=0.5)
    resumed.load_state_dict(strategy.state_dict())
    assert resumed.client_rank(_spec(None, client_id=3)) == 2


# --- FlexLoRA ----------------------------------------------------------------------------------


def test_flexlora_hands_each_client_the_best_rank_rc_approximation_of_the_aggregate() -> None:
    scaling = 2.0
    clients = [_state(11, rank=2), _state(12, rank=R), _state(13, rank=3)]
    ranks, counts = [2, None, 3], [10, 20, 30]
    server = ServerState(round=0, global_state=_state(14))
    strategy = FlexLoRA(scaling=scaling)
    strategy.aggregate(
        server, [_update(s, n, rank=r, client_id=i) for i, (s, n, r) in enumerate(zip(clients, counts, ranks))]
    )
    expected = scaling * sum(
        n / 60 * _product(s, r or R) for s, n, r in zip(clients, counts, ranks)
    )  # dW = sum_c w_c * s * B_c A_c
    for rank in (1, 2, 3, R):
        payload = strategy.configure_client(server, _spec(rank=rank))
        a, b = payload.state[A_NAME], payload.state[B_NAME]
        assert torch.count_nonzero(a[rank:]) == 0 and torch.count_nonzero(b[:, rank:]) == 0
        handed = scaling * (b.double() @ a.double())
        best, singular = _best_rank_approx(expected, rank)
        torch.testing.assert_close(handed, best)
        # Eckart-Young: the error is the norm of the discarded singular values
        error = torch.linalg.matrix_norm(expected - handed)
        torch.testing.assert_close(error, singular[rank:].square().sum().sqrt())
    head = (10 * clients[0][HEAD] + 20 * clients[1][HEAD] + 30 * clients[2][HEAD]) / 60
    torch.testing.assert_close(server.global_state[HEAD], head)


def test_flexlora_of_identical_full_rank_clients_is_that_clients_product_and_resumes() -> None:
    state = _state(15)
    server = ServerState(round=0, global_state=_state(16))
    strategy = FlexLoRA()
    strategy.aggregate(server, [_update(dict(state), n, rank=None, client_id=i) for i, n in enumerate((5, 9))])
    merged = server.global_state[B_NAME] @ server.global_state[A_NAME]
    torch.testing.assert_close(merged, _product(state))
    assert strategy.state_dict() == {}  # the global pair is the whole global model (no dead dW copy)


# --- FLoRA -------------------------------------------------------------------------------------


def test_stacking_is_exact_with_heterogeneous_ranks() -> None:
    g = torch.Generator().manual_seed(17)
    pairs = [(torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g)) for r in (1, 3, 4, 2)]
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    a_stacked, b_stacked = stack(pairs, weights)
    assert a_stacked.shape == (10, IN) and b_stacked.shape == (OUT, 10)
    expected = sum(float(w) * (b.double() @ a.double()) for (a, b), w in zip(pairs, weights))
    # The product in float64 of the float32 stacks: only the float32 rounding of w_c * A_c
    # remains (half an ulp per entry), bounded by eps * (|B| @ |A|); a float32 matmul would
    # add a summation-order error that depends on the CPU's BLAS.
    bound = torch.finfo(torch.float32).eps * (b_stacked.double().abs() @ a_stacked.double().abs())
    assert ((b_stacked.double() @ a_stacked.double() - expected).abs() <= bound).all()
    with pytest.raises(ValueError):
        stack(pairs, weights[:3])


def _flora_round(strategy: FLoRA, server: ServerState, seeds: tuple[int, int]) -> torch.Tensor:
    """One round of two clients (ranks 2 and R, 25 and 75 examples); returns the round's exact dW."""
    clients = [_state(seeds[0], rank=2, dtype=torch.float32), _state(seeds[1], dtype=torch.float32)]
    updates = [_update(clients[0], 25, rank=2, client_id=0), _update(clients[1], 75, rank=None, client_id=1)]
    strategy.aggregate(server, updates)
    return strategy.scaling * (0.25 * _product(clients[0], 2) + 0.75 * _product(clients[1]))


def test_flora_merges_the_exact_update_accumulates_it_and_restarts_lora() -> None:
    strategy = FLoRA(scaling=0.5, seed=0)
    server = ServerState(round=0, global_state=_state(18, dtype=torch.float32))
    first_a = server.global_state[A_NAME].clone()
    round1 = _flora_round(strategy, server, (19, 20))
    # merged in float64, stored in float32: one rounding, at most one float32 ulp of the scale
    ulp = torch.finfo(torch.float32).eps * float(round1.abs().max())
    torch.testing.assert_close(strategy.merged[PREFIX].double(), round1, rtol=0, atol=ulp)
    # fresh LoRA: B zero, A redrawn within peft's kaiming-uniform bound
    a, b = server.global_state[A_NAME], server.global_state[B_NAME]
    assert torch.count_nonzero(b) == 0
    assert float(a.abs().max()) <= IN**-0.5 and not torch.equal(a, first_a)
    payload = strategy.configure_client(server, _spec(rank=2))
    torch.testing.assert_close(payload.base_deltas[base_delta_name(PREFIX)].double(), round1, rtol=0, atol=ulp)
    assert torch.count_nonzero(payload.state[A_NAME][2:]) == 0
    round1_a = a.clone()
    round2 = _flora_round(strategy, server, (21, 22))
    both = round1 + round2  # two float32 roundings (round 1's stored delta, then the sum)
    ulp2 = torch.finfo(torch.float32).eps * (float(round1.abs().max()) + float(both.abs().max()))
    torch.testing.assert_close(strategy.merged[PREFIX].double(), both, rtol=0, atol=ulp2)
    assert not torch.equal(server.global_state[A_NAME], round1_a)


def test_flora_state_dict_round_trip_resumes_exactly() -> None:
    original = FLoRA(scaling=1.0, seed=1)
    server = ServerState(round=0, global_state=_state(23, dtype=torch.float32))
    _flora_round(original, server, (24, 25))
    saved = original.state_dict()
    resumed = FLoRA(scaling=1.0, seed=999)  # a different seed: everything must come from the state
    resumed.load_state_dict(saved)
    resumed_server = ServerState(round=1, global_state={k: v.clone() for k, v in server.global_state.items()})
    _flora_round(original, server, (26, 27))
    _flora_round(resumed, resumed_server, (26, 27))
    torch.testing.assert_close(resumed.merged[PREFIX], original.merged[PREFIX], rtol=0, atol=0)
    for name, value in server.global_state.items():
        torch.testing.assert_close(resumed_server.global_state[name], value, rtol=0, atol=0)


def test_flora_bytes_broadcast_the_stack_not_the_dense_delta() -> None:
    """The stack goes to every client each round (broadcast); a payload is the rest."""
    strategy = FLoRA(scaling=1.0, seed=2)
    server = ServerState(round=0, global_state=_state(28, dtype=torch.float32))
    _flora_round(strategy, server, (29, 30))  # stacked rank 2 + R
    payload = strategy.configure_client(server, _spec(rank=2))
    assert strategy.payload_bytes(payload, _spec(rank=2)) == server.global_state[HEAD].numel() * 4
    assert strategy.broadcast_bytes(server) == (2 + R) * (IN + OUT) * 4
