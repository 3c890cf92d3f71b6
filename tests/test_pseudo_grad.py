"""Universal Pseudo-Gradient: router signal, default outputs, expert pseudo-gradients."""

from __future__ import annotations

import torch

from ubsmoe.smoe.layer import Activation, MoEOptions, SparseMoE
from ubsmoe.smoe.pseudo_grad import (
    add_expert_pseudo_gradients,
    missed_token_steps,
    pseudo_gradient_coefficients,
    router_signal,
    update_defaults,
)

H, D, M = 16, 32, 4


def make_block(k: int, *, pg_router: bool = True, starve: int | None = 3, sink: bool = False) -> SparseMoE:
    """A block whose router never picks expert ``starve`` at K = 1 (its row is strongly negative)."""
    g = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(D, H, generator=g), torch.randn(D, generator=g)
    w2, b2 = torch.randn(H, D, generator=g), torch.randn(H, generator=g)
    block = SparseMoE(
        w1, b1, w2, b2, num_experts=M, activation=Activation("gelu"),
        options=MoEOptions(lora_rank=2, dmr=False, pg_router=pg_router, pg_expert_sink=sink), generator=g,
    ).double()  # fmt: skip
    with torch.no_grad():
        block.router.weight.normal_(generator=g)
        if starve is not None:
            block.router.weight[starve] = -10.0 * block.router.weight[: M - 1].abs().sum(0)
        for t in block.lora.tensors():
            t.normal_(generator=g)
    block.set_k(k)
    return block


def tokens(n: int = 40) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(1), dtype=torch.double).abs()


def loss_of(y: torch.Tensor) -> torch.Tensor:
    return (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()


def test_router_signal_keeps_value_and_routes_default_to_inactive_probs():
    g = torch.Generator().manual_seed(2)
    y = torch.randn(5, H, generator=g, dtype=torch.double)
    probs = torch.softmax(torch.randn(5, M, generator=g, dtype=torch.double), -1).requires_grad_(True)
    inactive = torch.rand(5, M, generator=g) > 0.5
    defaults = torch.randn(M, H, generator=g, dtype=torch.double)
    out = router_signal(y, probs, inactive, defaults)
    assert torch.equal(out, y)
    upstream = torch.randn(5, H, generator=g, dtype=torch.double)
    (out * upstream).sum().backward()
    expected = (upstream @ defaults.t()) * inactive
    torch.testing.assert_close(probs.grad, expected)


def test_router_signal_in_block_changes_router_gradient_not_output():
    x = tokens()
    outs, grads = [], []
    for pg_router in (False, True):
        block = make_block(1, pg_router=pg_router).train()
        with torch.no_grad():
            block.pg_default.normal_(generator=torch.Generator().manual_seed(3))
            block.pg_default_ready.fill_(True)
        y = block(x)
        loss_of(y).backward()
        outs.append(y.detach())
        grads.append(block.router.weight.grad.clone())
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(grads[0], grads[1])
    assert (grads[1].abs().sum(1) > 0).all()  # every expert's router row learns


def test_default_outputs_are_running_means_of_expert_outputs():
    x = tokens()
    block = make_block(2).train()
    block(x)
    routing = block.route(x)
    for e in range(M):
        rows = routing.active[:, e]
        if not rows.any():
            assert not block.pg_default_ready[e]
            continue
        xe = x[rows]
        lora = block.lora
        z = xe @ block.w1[e].t() + block.b1[e] + lora.scaling * (xe @ lora.lora_A1[e].t()) @ lora.lora_B1[e].t()
        u = torch.nn.functional.gelu(z)
        out = u @ block.w2t[e] + lora.scaling * (u @ lora.lora_A2[e].t()) @ lora.lora_B2[e].t()
        torch.testing.assert_close(block.pg_default[e], out.mean(0).detach())
    first = block.pg_default.clone()
    block(x * 0.5)
    ready = block.pg_default_ready
    assert not torch.allclose(block.pg_default[ready], first[ready])


def test_update_defaults_momentum():
    defaults, ready = torch.zeros(3, 2), torch.tensor([False, True, True])
    defaults[1:] = 1.0
    means = torch.full((3, 2), 3.0)
    update_defaults(defaults, ready, means, torch.tensor([True, True, False]), momentum=0.9)
    torch.testing.assert_close(defaults, torch.tensor([[3.0, 3.0], [1.2, 1.2], [1.0, 1.0]]))
    assert ready.tolist() == [True, True, True]


def step_grads(block: SparseMoE, x: torch.Tensor):
    block.train()
    block.reset_step()
    loss_of(block(x)).backward()
    return block.counters("step")


def test_pseudo_gradients_reach_experts_without_tokens():
    x = tokens()
    block = make_block(1)
    counters = step_grads(block, x)
    starved = counters["expert_tokens"] == 0
    assert starved[3] and starved.sum() < M
    real = [t.grad.clone() for t in block.lora.tensors()]
    for g in real:
        assert torch.count_nonzero(g[starved]) == 0  # PG off: nothing for starved experts

    coefficients = pseudo_gradient_coefficients(
        counters["tokens"], counters["inactive_mass"], counters["active_mass"], counters["active_assignments"],
        k=1, eta=0.1,
    )  # fmt: skip
    assert (coefficients > 0).all() and (coefficients <= 1).all()
    add_expert_pseudo_gradients(block.lora.tensors(), counters["expert_tokens"], coefficients)
    assignments = counters["expert_tokens"].sum()
    for tensor, before in zip(block.lora.tensors(), real, strict=True):
        # per-assignment mean: each expert's gradient already sums over its tokens
        g_bar = before.sum(0) / assignments.to(before.dtype)
        for e in range(M):
            added = tensor.grad[e] - before[e]
            torch.testing.assert_close(added, coefficients[e].to(before.dtype) * g_bar)
            assert added.norm() <= g_bar.norm() * (1 + 1e-12)
        assert torch.count_nonzero(tensor.grad[starved]) > 0  # PG on: starved experts learn


def test_coefficients_scale_with_sparsity_and_are_capped():
    tokens_, inactive = torch.tensor(10.0), torch.tensor([2.0, 1.0, 0.0, 0.5], dtype=torch.float64)
    active_mass, assignments = torch.tensor(6.0), torch.tensor(10.0)
    c1 = pseudo_gradient_coefficients(tokens_, inactive, active_mass, assignments, k=1, eta=0.1)
    c2 = pseudo_gradient_coefficients(tokens_, inactive, active_mass, assignments, k=2, eta=0.1)
    # eta * rho * P_off / P_on with rho = M / K, P_off = inactive / tokens, P_on = active_mass / assignments
    torch.testing.assert_close(c1, 0.1 * 4 * (inactive / 10.0) / 0.6)
    torch.testing.assert_close(c1, 2 * c2)
    capped = pseudo_gradient_coefficients(tokens_, inactive, active_mass, assignments, k=1, eta=10.0)
    assert capped.max() == 1.0
    empty = pseudo_gradient_coefficients(torch.tensor(0.0), inactive, active_mass, assignments, 1, 0.1)
    assert torch.count_nonzero(empty) == 0


def test_g_bar_is_the_per_assignment_mean_not_token_weighted() -> None:
    """Two experts with 1 and 3 tokens: g_bar = (G_0 + G_1) / 4, not (1 G_0 + 3 G_1) / 4."""
    param = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    param.grad = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    add_expert_pseudo_gradients([param], torch.tensor([1.0, 3.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(param.grad[2], torch.tensor([0.25, 0.75], dtype=torch.float64))


def _per_assignment_reference(block: SparseMoE, x: torch.Tensor, upstream: torch.Tensor):
    """sum_x q_i(x) sum_{j in A(x)} g_j(x) by autograd, one (token, expert) assignment at a time."""
    routing = block.route(x)
    probs, active = routing.probs.detach(), routing.active
    q = probs * (~active)
    lora = block.lora
    sums = [torch.zeros_like(t) for t in lora.tensors()]
    for token in range(x.shape[0]):
        for j in active[token].nonzero().flatten().tolist():
            a1, b1, a2, b2 = (t[j].detach().clone().requires_grad_(True) for t in lora.tensors())
            xe = x[token : token + 1]
            z = xe @ block.w1[j].t() + block.b1[j] + lora.scaling * (xe @ a1.t()) @ b1.t()
            u = torch.nn.functional.gelu(z)
            y = u @ block.w2t[j] + lora.scaling * (u @ a2.t()) @ b2.t()
            grads = torch.autograd.grad((y * upstream[token]).sum(), (a1, b1, a2, b2))
            for total, g in zip(sums, grads, strict=True):
                total += q[token][:, None, None] * g[None]
    mass = q.sum(0) * block.k
    return sums, mass


def test_missed_token_sums_equal_per_assignment_gradients_weighted_by_router_probability() -> None:
    x = tokens(24)
    block = make_block(2, sink=True).train()
    block.reset_step()
    y = block(x)
    upstream = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * upstream).sum().backward()
    sink = block.pg_sink
    assert sink is not None
    ref_sums, ref_mass = _per_assignment_reference(block, x, upstream)
    torch.testing.assert_close(sink.mass, ref_mass.to(torch.float64))
    for got, ref in zip(sink.sums, ref_sums, strict=True):
        torch.testing.assert_close(got, ref)


def _two_starved_block() -> SparseMoE:
    """K = 1 of 4; experts 2 and 3 never win, with different router-probability profiles."""
    block = make_block(1, sink=True, starve=None)
    with torch.no_grad():
        w = block.router.weight
        w[2] = -6.0 * w[:2].abs().sum(0) + torch.linspace(0, 2, H, dtype=w.dtype)
        w[3] = -6.0 * w[:2].abs().sum(0) - torch.linspace(0, 2, H, dtype=w.dtype)
    return block


def test_missed_token_steps_scale_with_eta_and_differ_between_starved_experts() -> None:
    x = tokens(40)
    block = _two_starved_block().train()
    counters = step_grads(block, x)
    assert counters["expert_tokens"][2] == 0 and counters["expert_tokens"][3] == 0
    args = (counters["tokens"], counters["inactive_mass"], counters["active_mass"], counters["active_assignments"])
    small = pseudo_gradient_coefficients(*args, k=1, eta=1e-3)
    assert (small < 1).all()
    steps1 = missed_token_steps(block.pg_sink, small)
    steps2 = missed_token_steps(block.pg_sink, pseudo_gradient_coefficients(*args, k=1, eta=2e-3))
    for s1, s2 in zip(steps1, steps2, strict=True):
        torch.testing.assert_close(s2, 2 * s1)  # linear in eta (below the cap)
        # RMS of expert i's step = c_i: an Adam-sized step times eta * rho_c * P_off / P_on
        rms = s1.reshape(M, -1).square().mean(1).sqrt()
        live = rms > 0
        torch.testing.assert_close(rms[live], small[live].to(rms.dtype))
    for step in steps1:
        a, b = step[2].flatten(), step[3].flatten()
        assert a.norm() > 0 and b.norm() > 0
        cosine = float(a @ b / (a.norm() * b.norm()))
        assert cosine < 0.99  # each starved expert follows the tokens it was closest to


def test_shared_mean_gives_every_starved_expert_the_same_direction() -> None:
    """The first design (kept as expert_mode=shared_mean): parallel updates, the behaviour missed_tokens replaces."""
    x = tokens(40)
    block = _two_starved_block().train()
    counters = step_grads(block, x)
    args = (counters["tokens"], counters["inactive_mass"], counters["active_mass"], counters["active_assignments"])
    add_expert_pseudo_gradients(block.lora.tensors(), counters["expert_tokens"], pseudo_gradient_coefficients(*args, k=1, eta=0.1))
    for t in block.lora.tensors():
        a, b = t.grad[2].flatten(), t.grad[3].flatten()
        torch.testing.assert_close(float(a @ b / (a.norm() * b.norm())), 1.0)


def test_no_missed_tokens_at_k_equal_m() -> None:
    x = tokens(16)
    block = make_block(M, sink=True, starve=None).train()
    step_grads(block, x)
    assert block.pg_sink is None  # the dense path dispatches nothing and misses nothing
