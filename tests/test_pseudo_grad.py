"""Universal Pseudo-Gradient: router signal, default outputs, expert pseudo-gradients."""

from __future__ import annotations

import torch

from ubsmoe.smoe.layer import Activation, MoEOptions, SparseMoE
from ubsmoe.smoe.pseudo_grad import (
    add_expert_pseudo_gradients,
    pseudo_gradient_coefficients,
    router_signal,
    update_defaults,
)

H, D, M = 16, 32, 4


def make_block(k: int, *, pg_router: bool = True, starve: int | None = 3) -> SparseMoE:
    """A block whose router never picks expert ``starve`` at K = 1 (its row is strongly negative)."""
    g = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(D, H, generator=g), torch.randn(D, generator=g)
    w2, b2 = torch.randn(H, D, generator=g), torch.randn(H, generator=g)
    block = SparseMoE(
        w1, b1, w2, b2, num_experts=M, activation=Activation("gelu"),
        options=MoEOptions(lora_rank=2, dmr=False, pg_router=pg_router), generator=g,
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
    weights = counters["expert_tokens"] / counters["expert_tokens"].sum()
    for tensor, before in zip(block.lora.tensors(), real, strict=True):
        g_bar = torch.tensordot(weights.to(before.dtype), before, dims=1)
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
