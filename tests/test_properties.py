"""Property-based tests (hypothesis): invariants that must hold for every input, not one example.

Tensors are drawn from seeds (``torch.randn`` with a hypothesis-chosen seed) rather than
element by element, which keeps each example cheap; shapes, counts, ranks, K, masks and
weights are drawn by hypothesis. Where a property says "exact", the inputs are integers
and dyadic weights in float64, so every sum is exact whatever the summation order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from helpers import make_update
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubsmoe.callbacks.dmr import dmr_update
from ubsmoe.data.partition import partition
from ubsmoe.fl.client import ClientPayload
from ubsmoe.fl.server import ServerState
from ubsmoe.fl.strategies import FedAvg, SparseMoEStrategy
from ubsmoe.fl.strategies.flora import stack
from ubsmoe.fl.strategies.lora_pairs import leading_pair, pad_pair, pair_product, truncate_pair
from ubsmoe.fl.validation import validate_update
from ubsmoe.settings import DMRSettings
from ubsmoe.smoe.layer import Activation, MoEOptions, SparseMoE
from ubsmoe.smoe.routing import num_candidates, route

FAST = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**31 - 1)
EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- partitions
@FAST
@given(
    n=st.integers(20, 300),
    num_labels=st.integers(1, 5),
    num_clients=st.integers(1, 10),
    min_size=st.integers(0, 5),
    alpha=st.floats(0.05, 50.0),
    method=st.sampled_from(["dirichlet", "iid"]),
    seed=seeds,
)
def test_partition_places_every_example_once_with_min_sizes_and_labels(
    n: int, num_labels: int, num_clients: int, min_size: int, alpha: float, method: str, seed: int
) -> None:
    if num_clients * min_size > n:
        min_size = n // num_clients
    labels = np.random.default_rng(seed).integers(0, num_labels, n)
    parts = partition(labels, method=method, num_clients=num_clients, alpha=alpha, min_size=min_size, seed=seed)
    assert len(parts) == num_clients
    everything = np.concatenate(parts)
    assert np.array_equal(np.sort(everything), np.arange(n))  # every example exactly once
    if method == "dirichlet":
        assert min(p.size for p in parts) >= min_size
    else:
        assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
    per_client = sum(np.bincount(labels[p], minlength=num_labels) for p in parts)
    assert np.array_equal(per_client, np.bincount(labels, minlength=num_labels))  # labels preserved
    again = partition(labels, method=method, num_clients=num_clients, alpha=alpha, min_size=min_size, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


# ----------------------------------------------------------------------------- aggregation
def random_state(seed: int, shapes: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(shape, generator=g) for i, shape in enumerate(shapes)}


shape_lists = st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4)


def fedavg(states: list[dict[str, torch.Tensor]], counts: list[int], *, sparse: bool) -> dict[str, torch.Tensor]:
    server = ServerState(round=0, global_state={k: torch.zeros_like(v) for k, v in states[0].items()})
    updates = [make_update(s, n, client_id=i) for i, (s, n) in enumerate(zip(states, counts, strict=True))]
    strategy = SparseMoEStrategy(list(states[0])[:1], exponent=0.0) if sparse else FedAvg()
    strategy.aggregate(server, updates)
    return server.global_state


@FAST
@given(shapes=shape_lists, seed=seeds, counts=st.lists(st.integers(1, 1000), min_size=1, max_size=6), sparse=st.booleans())
def test_identical_updates_aggregate_to_that_update(shapes, seed, counts, sparse) -> None:
    state = random_state(seed, shapes)
    out = fedavg([dict(state) for _ in counts], counts, sparse=sparse)
    assert all(torch.equal(out[k], v) for k, v in state.items())


@FAST
@given(
    shapes=shape_lists,
    seed=seeds,
    counts=st.lists(st.integers(1, 1000), min_size=2, max_size=6),
    order=st.randoms(use_true_random=False),
    sparse=st.booleans(),
)
def test_client_order_is_irrelevant_and_weights_follow_example_counts(shapes, seed, counts, order, sparse) -> None:
    states = [random_state(seed + i, shapes) for i in range(len(counts))]
    out = fedavg(states, counts, sparse=sparse)
    perm = list(range(len(counts)))
    order.shuffle(perm)
    shuffled = fedavg([states[i] for i in perm], [counts[i] for i in perm], sparse=sparse)
    total = sum(counts)
    for name in out:
        expected = sum(n / total * s[name].double() for s, n in zip(states, counts, strict=True))
        # accumulated in float64, cast once: within one float32 rounding of the exact mean
        scale = float(max(s[name].abs().max() for s in states))
        assert float((out[name].double() - expected).abs().max()) <= EPS32 * scale
        assert float((shuffled[name].double() - out[name].double()).abs().max()) <= EPS32 * scale


# ----------------------------------------------------------------------------- routing
@FAST
@given(
    tokens=st.integers(1, 40),
    m=st.integers(1, 8),
    data=st.data(),
    seed=seeds,
    kappa=st.floats(0.0, 3.0),
    np_ratio=st.floats(1.0, 4.0),
)
def test_routing_activates_exactly_k_experts_inside_the_dmr_candidates(tokens, m, data, seed, kappa, np_ratio) -> None:
    k = data.draw(st.integers(1, m))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, m, generator=g, dtype=torch.float64)
    phi = torch.rand(m, generator=g, dtype=torch.float64) * 2 - 1
    routing = route(logits, k, phi=phi, kappa=kappa, np_ratio=np_ratio)
    assert torch.equal(routing.active.sum(1), torch.full((tokens,), k))
    assert torch.equal(routing.active.gather(1, routing.experts), torch.ones(tokens, k, dtype=torch.bool))
    n_p = num_candidates(k, m, np_ratio)
    candidates = torch.zeros_like(routing.active).scatter_(1, logits.topk(n_p, dim=1).indices, True)
    assert not (routing.active & ~candidates).any()  # DMR only re-ranks the router's own candidates


@FAST
@given(batch=st.integers(1, 4), length=st.integers(1, 8), data=st.data(), seed=seeds)
def test_the_layer_routes_k_experts_per_real_token_and_never_padding(batch, length, data, seed) -> None:
    h, d, m = 8, 16, 4
    k = data.draw(st.integers(1, m))
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length)))
    mask = mask.reshape(batch, length)
    g = torch.Generator().manual_seed(seed)
    block = SparseMoE(
        torch.randn(d, h, generator=g), torch.randn(d, generator=g), torch.randn(h, d, generator=g),
        torch.randn(h, generator=g), num_experts=m, activation=Activation("gelu"),
        options=MoEOptions(lora_rank=2), generator=g,
    ).double()  # fmt: skip
    with torch.no_grad():
        block.router.weight.normal_(generator=g)
        block.phi.uniform_(-1, 1, generator=g)
    block.set_k(k)
    block.token_mask = mask
    x = torch.randn(batch, length, h, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    counters = block.counters()
    real = int(mask.sum())
    assert counters["tokens"] == real
    assert float(counters["expert_tokens"].sum()) == k * real  # exactly K per real token, padding never routed
    padding = ~mask
    if k < m:  # dispatched: padding gets only the bias (K = M runs the dense FFN on every position, as dense does)
        assert torch.equal(y[padding], block.b2.expand(int(padding.sum()), h))


# ----------------------------------------------------------------------------- DMR
finite = {"allow_nan": False, "allow_infinity": False}


@FAST
@given(
    m=st.integers(1, 16),
    seed=seeds,
    mean_k=st.floats(0.0, 16.0),
    zeta=st.floats(0.0, 1.0),
    bounds=st.tuples(st.floats(-5, 5, **finite), st.floats(0.01, 5, **finite)),
    phi_scale=st.floats(0.0, 100.0),
)
def test_dmr_keeps_phi_in_its_range(m, seed, mean_k, zeta, bounds, phi_scale) -> None:
    phi_min, width = bounds
    # the range is the server clip's guarantee (method.dmr.server_clip; the paper's default leaves it
    # to the local penalty, see tests/test_paper_routing.py for the divergence without both)
    settings_ = DMRSettings(zeta=zeta, phi_min=phi_min, phi_max=phi_min + width, eps=1e-6, server_clip=True)
    g = torch.Generator().manual_seed(seed)
    phi_bar = torch.randn(m, generator=g) * phi_scale
    utilization = torch.rand(m, generator=g) * torch.randint(0, 2, (m,), generator=g)  # some experts unused
    out = dmr_update(phi_bar, utilization, mean_k, settings_)
    assert out.shape == phi_bar.shape and bool(torch.isfinite(out).all())
    # phi is float32: its range is the float32 nearest to each bound (clip, then one rounding)
    low, high = (float(torch.tensor(v, dtype=torch.float32)) for v in (settings_.phi_min, settings_.phi_max))
    assert float(out.min()) >= low and float(out.max()) <= high


# ----------------------------------------------------------------------------- ranks and stacking
def integer_pair(g: torch.Generator, rank: int, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randint(-8, 9, (rank, n_in), generator=g).double()
    b = torch.randint(-8, 9, (n_out, rank), generator=g).double()
    return a, b


@FAST
@given(full=st.integers(1, 8), data=st.data(), n_in=st.integers(1, 6), n_out=st.integers(1, 6), seed=seeds)
def test_truncation_is_cutting_then_zero_padding_with_the_exact_product(full, data, n_in, n_out, seed) -> None:
    rank = data.draw(st.integers(1, full))
    a, b = integer_pair(torch.Generator().manual_seed(seed), full, n_in, n_out)
    ta, tb = truncate_pair(a, b, rank)
    la, lb = leading_pair(a, b, rank)
    pa, pb = pad_pair(la, lb, full)
    assert torch.equal(ta, pa) and torch.equal(tb, pb)
    assert torch.count_nonzero(ta[rank:]) == 0 and torch.count_nonzero(tb[:, rank:]) == 0
    expected = sum(torch.outer(b[:, i], a[i]) for i in range(rank))  # integers: exact
    assert torch.equal(pair_product(ta, tb), expected) and torch.equal(pair_product(la, lb), expected)


@FAST
@given(
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    n_in=st.integers(1, 6),
    n_out=st.integers(1, 6),
    seed=seeds,
    numerators=st.lists(st.integers(0, 64), min_size=5, max_size=5),
)
def test_flora_stacking_gives_the_exact_weighted_sum_of_products(ranks, n_in, n_out, seed, numerators) -> None:
    g = torch.Generator().manual_seed(seed)
    pairs = [integer_pair(g, r, n_in, n_out) for r in ranks]
    weights = torch.tensor([n / 64 for n in numerators[: len(ranks)]], dtype=torch.float64)  # dyadic: exact
    a_stacked, b_stacked = stack(pairs, weights)
    assert a_stacked.shape == (sum(ranks), n_in) and b_stacked.shape == (n_out, sum(ranks))
    expected = sum(float(w) * (b @ a) for (a, b), w in zip(pairs, weights, strict=True))
    assert torch.equal(b_stacked @ a_stacked, expected)


# ----------------------------------------------------------------------------- validation
CORRUPTIONS = ["nan", "inf", "-inf", "shape", "dtype", "missing", "extra"]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(shapes=shape_lists, seed=seeds, data=st.data(), corruption=st.sampled_from(CORRUPTIONS))
def test_any_single_corrupted_tensor_is_caught(shapes, seed, data, corruption) -> None:
    sent = ClientPayload(state=random_state(seed, shapes), pg_defaults=random_state(seed + 1, shapes[:1]))
    where = data.draw(st.sampled_from(["state", "pg_defaults"]))
    update = make_update(
        {k: v + 0.5 for k, v in sent.state.items()}, 10, pg_defaults={k: v.clone() for k, v in sent.pg_defaults.items()}
    )
    assert validate_update(update, sent) is None
    tensors = getattr(update, where)
    name = data.draw(st.sampled_from(sorted(tensors)))
    tensor = tensors[name].clone()
    if corruption in ("nan", "inf", "-inf"):
        tensor.view(-1)[data.draw(st.integers(0, tensor.numel() - 1))] = float(corruption)
        tensors[name] = tensor
    elif corruption == "shape":
        tensors[name] = torch.cat([tensor.reshape(-1), tensor.new_zeros(1)])
    elif corruption == "dtype":
        tensors[name] = tensor.double()
    elif corruption == "missing":
        del tensors[name]
    else:
        tensors[name + ".extra"] = tensor
    rejection = validate_update(update, sent)
    assert rejection is not None
    assert rejection.reason.startswith(where)
    assert math.isfinite(len(rejection.reason))
