"""SparseMoE block and routing on a small synthetic FFN (pure torch, no backbone)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ubsmoe.smoe.flops import measure_flops
from ubsmoe.smoe.layer import Activation, MoEOptions, SparseMoE
from ubsmoe.smoe.routing import num_candidates, range_penalty, route, switch_balance_loss, unit_gates

H, D, M = 16, 32, 4


def make_block(k: int = M, *, act: Activation | None = None, **options) -> SparseMoE:
    """A double-precision block with random base weights, router, phi and non-zero LoRA."""
    g = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(D, H, generator=g), torch.randn(D, generator=g)
    w2, b2 = torch.randn(H, D, generator=g), torch.randn(H, generator=g)
    opts = MoEOptions(lora_rank=3, **options)
    block = SparseMoE(
        w1, b1, w2, b2, num_experts=M, activation=act or Activation("gelu"), options=opts, generator=g
    ).double()
    with torch.no_grad():
        block.router.weight.normal_(generator=g)
        block.phi.normal_(generator=g)
        block.pg_default.normal_(generator=g)  # PG defaults as if earlier steps had filled them
        block.pg_default_ready.fill_(True)
        for t in block.lora.tensors():
            t.normal_(generator=g)
    block.set_k(k)
    return block


def inputs(batch: int = 3, length: int = 7, pad_last: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, length, H, generator=g, dtype=torch.double)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, length - pad_last :] = False
    return x, mask


def run(block: SparseMoE, x: torch.Tensor, mask: torch.Tensor, dispatch: str):
    block.dispatch = dispatch
    block.token_mask = mask
    block.train()
    xg = x.clone().requires_grad_(True)
    y = block(xg)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=y.dtype)
    (y * weight * mask[..., None]).sum().backward()
    grads = [xg.grad, block.router.weight.grad, block.phi.grad, *(t.grad for t in block.lora.tensors())]
    return (y * mask[..., None]).detach(), grads


@pytest.mark.parametrize("pg_router", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, M])
def test_kernels_match_masked_loop_reference(k, pg_router):
    """Values and every gradient (input, router, phi, expert LoRA) of the kernels equal autograd's."""
    x, mask = inputs()
    y_fast, g_fast = run(make_block(k, pg_router=pg_router), x, mask, "sorted")
    y_ref, g_ref = run(make_block(k, pg_router=pg_router), x, mask, "masked_loop")
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fallback_activation_module_matches_reference():
    act = Activation("custom", nn.Tanh())
    x, mask = inputs()
    y_fast, g_fast = run(make_block(2, act=act, pg_router=False), x, mask, "sorted")
    y_ref, g_ref = run(make_block(2, act=act, pg_router=False), x, mask, "masked_loop")
    torch.testing.assert_close(y_fast, y_ref)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_only_selected_experts_run():
    x, mask = inputs(pad_last=3)
    block = make_block(2, pg_router=False).eval()
    block.token_mask = mask
    flat = x.reshape(-1, H)
    with torch.no_grad():
        routing = block.route(flat)
    valid = mask.reshape(-1)
    expected = torch.bincount(routing.experts[valid].reshape(-1), minlength=M).double()
    flops = measure_flops(lambda: block(x))
    counters = block.counters()
    assert torch.equal(counters["expert_tokens"], expected)
    assert counters["tokens"] == valid.sum()
    assert expected.sum() == 2 * valid.sum()
    assert (expected < valid.sum()).any()  # some expert really was skipped for some tokens
    # FLOPs = router on all tokens + exactly the dispatched (token, expert) pairs, nothing more.
    r, de = 3, D // M
    per_assignment = 2 * 2 * H * de + 2 * r * (H + de) * 2
    assert flops == 2 * H * M * flat.shape[0] + int(expected.sum()) * per_assignment
    # padding tokens get only the shared bias b2
    y = block(x)
    torch.testing.assert_close(y[~mask], block.b2.expand(int((~mask).sum()), H))


def test_k_equal_m_is_the_dense_ffn_and_telemetry_counts_all():
    g = torch.Generator().manual_seed(3)
    w1, b1, w2, b2 = torch.randn(D, H, generator=g), torch.randn(D, generator=g), torch.randn(H, D, generator=g), (
        torch.randn(H, generator=g)
    )
    block = SparseMoE(w1, b1, w2, b2, num_experts=M, activation=Activation("gelu"), options=MoEOptions(lora_rank=2))
    x = torch.randn(5, H, generator=g)
    # The reference in float64: float32 results differ in summation order between BLAS
    # kernels (3e-6 apart on outputs of magnitude ~30 on some CPUs), so the tolerance is
    # relative to the outputs' scale, a few float32 epsilons of it.
    w1d, b1d, w2d, b2d, xd = (t.double() for t in (w1, b1, w2, b2, x))
    expected = torch.nn.functional.gelu(xd @ w1d.t() + b1d) @ w2d.t() + b2d  # unpermuted: experts = neuron blocks
    scale = float(expected.abs().max())
    torch.testing.assert_close(block(x).double(), expected, rtol=0, atol=8 * torch.finfo(torch.float32).eps * scale)
    assert torch.equal(block.counters()["expert_tokens"], torch.full((M,), 5.0, dtype=torch.float64))
    assert block.counters()["max_load_fraction"] == 1.0


def test_unit_gates_are_exactly_one_with_gradient():
    p = torch.softmax(torch.randn(6, M, dtype=torch.double), -1).requires_grad_(True)
    g = unit_gates(p)
    assert torch.equal(g.detach(), torch.ones_like(g))
    (g * torch.arange(M, dtype=torch.double)).sum().backward()
    assert torch.equal(p.grad, torch.arange(M, dtype=torch.double).expand(6, M))


def test_route_topk_and_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    r = route(logits, 2)
    assert r.experts.tolist() == [[0, 1]]
    assert r.active.tolist() == [[True, True, False, False]]
    # phi lifts expert 2 (inside the candidates: N_p = 4) above expert 1
    r = route(logits, 2, phi=torch.tensor([0.0, 0.0, 1.5, 0.0]), kappa=1.0, np_ratio=2.0)
    assert sorted(r.experts.tolist()[0]) == [0, 2]
    # with N_p = 2 (np_ratio 1), expert 2 is not a candidate and phi cannot pull it in
    r = route(logits, 2, phi=torch.tensor([0.0, 0.0, 5.0, 0.0]), kappa=1.0, np_ratio=1.0)
    assert sorted(r.experts.tolist()[0]) == [0, 1]
    # ... nor can pushing a candidate below it let it in (found by test_properties)
    r = route(logits, 2, phi=torch.tensor([0.0, -5.0, 0.0, 0.0]), kappa=1.0, np_ratio=1.0)
    assert sorted(r.experts.tolist()[0]) == [0, 1]
    assert num_candidates(2, 8, 2.0) == 4 and num_candidates(3, 8, 2.0) == 6 and num_candidates(6, 8, 2.0) == 8
    with pytest.raises(ValueError):
        route(logits, 0)
    with pytest.raises(ValueError):
        route(logits, 5)


def test_positive_phi_raises_expert_share():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2000, 8, generator=g)
    base = route(logits, 2, phi=torch.zeros(8)).active.float().mean(0)
    phi = torch.zeros(8)
    phi[5] = 1.0
    lifted = route(logits, 2, phi=phi, kappa=1.0).active.float().mean(0)
    assert lifted[5] > base[5] + 0.1
    phi[5] = -1.0
    lowered = route(logits, 2, phi=phi, kappa=1.0).active.float().mean(0)
    assert lowered[5] < base[5] - 0.1


def test_phi_in_block_changes_routing_and_gets_gradient():
    x, mask = inputs()
    block = make_block(1, pg_router=False)
    with torch.no_grad():
        block.phi.zero_()
    block.token_mask = mask
    block(x)
    before = block.counters()["expert_tokens"].clone()
    block.reset_telemetry()
    with torch.no_grad():
        block.phi[int(before.argmin())] = 3.0
    block(x).sum().backward()
    after = block.counters()["expert_tokens"]
    assert after[int(before.argmin())] > before[int(before.argmin())]
    assert block.phi.grad is not None and block.phi.grad.abs().sum() > 0


def test_range_penalty_zero_inside_and_grows_outside():
    assert range_penalty(torch.tensor([-1.0, 0.0, 0.5, 1.0]), -1.0, 1.0, 0.1) == 0.0
    small = range_penalty(torch.tensor([1.5]), -1.0, 1.0, 0.1)
    large = range_penalty(torch.tensor([2.5]), -1.0, 1.0, 0.1)
    below = range_penalty(torch.tensor([-2.0]), -1.0, 1.0, 0.1)
    assert 0 < small < large
    torch.testing.assert_close(small, torch.tensor(0.1 * 0.25))
    torch.testing.assert_close(below, torch.tensor(0.1 * 1.0))


def test_switch_balance_loss_is_one_when_balanced():
    probs = torch.full((8, 4), 0.25)
    torch.testing.assert_close(switch_balance_loss(probs, torch.tensor([4, 4, 4, 4]), 2), torch.tensor(1.0))
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(8, 4)
    assert switch_balance_loss(skewed, torch.tensor([8, 8, 0, 0]), 2) > 1.0


def test_bad_k_and_width():
    block = make_block()
    with pytest.raises(ValueError):
        block.set_k(0)
    with pytest.raises(ValueError):
        block.set_k(M + 1)
    with pytest.raises(ValueError, match="divide"):
        SparseMoE(torch.zeros(30, H), torch.zeros(30), torch.zeros(H, 30), torch.zeros(H), num_experts=4,
                  activation=Activation("gelu"))  # fmt: skip
