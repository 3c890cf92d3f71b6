"""The native block's expert kernel: grouped products against the loop, PG's missed tokens, DMR's N_p, gate norms.

Everything runs on CPU. ``grouped_mm`` runs here in float32 only, so the float64 checks put an
emulation with the grouped product's contract (rows past the last offset and empty groups
left undefined: NaN here) in its place, which checks the plan's offsets and the masking of
the padding tail exactly; a float32 check runs the real ``grouped_mm``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ubsmoe.backbones.native_convert import convert
from ubsmoe.backbones.tiny import tiny_model
from ubsmoe.smoe.native_kernels import (
    GroupedProducts,
    MissedTokenArgs,
    SegmentProducts,
    SwiGLUExperts,
    products_class,
    sort_assignments,
)
from ubsmoe.smoe.pseudo_grad import MissedTokenSink, missed_token_steps, pseudo_gradient_coefficients

TOP_K = 4
HIDDEN = 64


def emulated_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm``'s contract in any dtype: unwritten rows (past the last offset) and empty groups are NaN."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    if b.dim() == 3:  # [A, k] x [E, k, n] -> [A, n]
        out = torch.full((a.shape[0], b.shape[2]), float("nan"), dtype=a.dtype)
        for e, (start, end) in enumerate(zip(starts, ends, strict=True)):
            out[start:end] = a[start:end] @ b[e]
        return out
    out = torch.full((len(ends), a.shape[0], b.shape[1]), float("nan"), dtype=a.dtype)  # [m, A] x [A, n]
    for e, (start, end) in enumerate(zip(starts, ends, strict=True)):
        if end > start:
            out[e] = a[:, start:end] @ b[start:end]
    return out


def sharp_block(family: str = "olmoe", seed: int = 0, dtype: torch.dtype = torch.float64, **convert_args):
    """Layer 0's converted block of a tiny model (top-4 of 8 experts) with decisive routers and non-zero LoRA."""
    model = tiny_model(family, seed=seed, num_experts_per_tok=TOP_K)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0, generator=g)
    # rank 4: 16-byte rows of LoRA B in float32, which grouped_mm needs
    convert(model, **{"lora_rank": 4, "generator": torch.Generator().manual_seed(0), **convert_args})
    block = model.model.layers[0].mlp.to(dtype)
    with torch.no_grad():
        for t in (*block.lora.tensors(), block.phi, block.pg_default):
            t.normal_(0.0, 0.5, generator=g)
        block.pg_default_ready.fill_(True)
    block.train()
    return block


def inputs(dtype: torch.dtype, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [2, 6, h]``, a padding mask (3 padding tokens) and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, HIDDEN, generator=g, dtype=dtype)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    return x, mask, torch.randn(2, 6, HIDDEN, generator=g, dtype=dtype)


def kernel_run(block, x, dy, valid, products_of, with_missed: bool):
    """The kernel alone (routing from the block, gradients for x, gates and the LoRA stacks)."""
    flat = x.reshape(-1, HIDDEN).clone().requires_grad_(True)
    routing, gates = block.route(flat.detach())
    gates = gates.detach().requires_grad_(True)
    plan = sort_assignments(routing.experts, gates, valid, block.num_experts)
    lora = [t.detach().clone().requires_grad_(True) for t in block.lora.tensors()]
    missed = None
    if with_missed:
        inactive = (~routing.active) & valid[:, None]
        missed = MissedTokenArgs(MissedTokenSink(), routing.probs.detach() * inactive.to(flat.dtype))
    experts = block.experts
    y, sums = SwiGLUExperts.apply(
        flat, plan.gates, *lora, plan, experts.gate_up_proj.detach(), experts.down_proj.detach(), block.lora.scaling,
        block.activation, True, products_of(plan), missed,
    )  # fmt: skip
    (y * dy.reshape(-1, HIDDEN)).sum().backward()
    out = [y.detach(), sums, flat.grad, gates.grad, *(t.grad for t in lora)]
    if missed is not None:
        out += [*missed.sink.sums, missed.sink.mass]
    return out, plan


@pytest.mark.parametrize("k", [1, 2, TOP_K])
def test_grouped_products_equal_the_loop_in_float64(k):
    """Values, sums, gradients (x, gates, LoRA) and missed-token sums: grouped (emulated) == loop, with padding."""
    block = sharp_block()
    block.set_k(k)
    x, mask, dy = inputs(torch.float64)
    valid = mask.reshape(-1)
    loop, plan = kernel_run(block, x, dy, valid, SegmentProducts, True)
    grouped, _ = kernel_run(block, x, dy, valid, lambda p: GroupedProducts(p, mm=emulated_grouped_mm), True)
    if k == 1:
        assert bool((plan.counts == 0).any())  # experts that receive no token
    assert int(plan.counts.sum()) == int(valid.sum()) * k and plan.experts.shape[0] == valid.numel() * k
    assert bool((plan.experts[int(plan.counts.sum()) :] == block.num_experts).all())  # padding sorted last
    for a, b in zip(loop, grouped, strict=True):
        assert bool(torch.isfinite(b).all())
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    y, grad_x = loop[0], loop[2]
    assert torch.equal(y[~valid], torch.zeros_like(y[~valid]))  # padding is never dispatched
    assert torch.equal(grad_x[~valid], torch.zeros_like(grad_x[~valid]))


def test_the_kernel_equals_the_block_autograd_reference_with_padding():
    """The sorted kernel (loop products) and the plain-autograd dispatch give the same block output and gradients."""
    results = []
    for dispatch in ("sorted", "autograd"):
        block = sharp_block(seed=3)
        block.set_k(2)
        block.dispatch = dispatch
        x, mask, dy = inputs(torch.float64)
        x.requires_grad_(True)
        block.token_mask = mask
        (block(x) * dy).sum().backward()
        results.append([x.grad, block.router.weight.grad, block.phi.grad, *(t.grad for t in block.lora.tensors())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, TOP_K])
def test_real_grouped_mm_equals_the_loop_in_float32(k):
    """torch's grouped_mm (as on a GPU) against the loop on the whole block, PG sink included (float32, CPU)."""
    results = []
    for kernel in ("loop", "grouped"):
        block = sharp_block(seed=4, dtype=torch.float32, expert_kernel=kernel)
        block.set_k(k)
        x, mask, dy = inputs(torch.float32)
        x.requires_grad_(True)
        block.token_mask = mask
        (block(x) * dy).sum().backward()
        sink = block.pg_sink
        results.append([x.grad, block.router.weight.grad, block.phi.grad, *(t.grad for t in block.lora.tensors()),
                         block.pg_default.clone(), *sink.sums, sink.mass])  # fmt: skip
    tensors = (x, block.experts.gate_up_proj, block.experts.down_proj, *block.lora.tensors())
    assert products_class("grouped", *tensors) is GroupedProducts  # the real grouped_mm ran
    assert products_class("auto", torch.zeros(2, HIDDEN)) is SegmentProducts  # the loop on CPU
    assert products_class("grouped", torch.zeros(2, HIDDEN, dtype=torch.float64)) is SegmentProducts
    for a, b in zip(*results, strict=True):  # summation order differs: tolerance scaled to magnitude
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_grouped_path_never_asks_the_host(monkeypatch):
    """Forward and backward on the grouped path with padding call no host-synchronising tensor method."""
    block = sharp_block(seed=5, dtype=torch.float32, expert_kernel="grouped", balance_loss=True)
    block.set_k(2)
    x, mask, dy = inputs(torch.float32)
    x.requires_grad_(True)
    block.token_mask = mask

    def refuse(*_args, **_kwargs):
        raise AssertionError("host synchronisation on the grouped path")

    for name in ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)
    monkeypatch.setattr(torch, "bincount", refuse)
    y = block(x)
    ((y * dy).sum() + block.aux_loss).backward()
    monkeypatch.undo()
    assert block.pg_sink is not None and block.lora.lora_A1.grad is not None


def per_token_reference(block, x: torch.Tensor, dy: torch.Tensor, valid: torch.Tensor):
    """PG's missed-token directions by definition, in float64: one autograd call per (token, active expert).

    h_i = sum_x q_i(x) sum_{j in A(x)} g_j(x) / sum_x K q_i(x), with g_j(x) the gradient of
    expert j's LoRA from token x alone (its gate held fixed) and q_i(x) = p_i(x) where i is
    not active on the real token x.
    """
    lora = block.lora
    experts = block.experts
    d = block.expert_size
    with torch.no_grad():
        routing, gates = block.route(x)
    q = routing.probs * ((~routing.active) & valid[:, None])
    sums = [torch.zeros_like(t) for t in lora.tensors()]
    k = routing.experts.shape[1]
    for t in range(x.shape[0]):
        if not valid[t]:
            continue
        for slot in range(k):
            j = int(routing.experts[t, slot])
            a1, b1, a2, b2 = (p[j].detach().clone().requires_grad_(True) for p in lora.tensors())
            gu = experts.gate_up_proj[j] @ x[t] + lora.scaling * (b1 @ (a1 @ x[t]))
            hidden = F.silu(gu[:d]) * gu[d:]
            out = experts.down_proj[j] @ hidden + lora.scaling * (b2 @ (a2 @ hidden))
            grads = torch.autograd.grad(gates[t, slot] * (dy[t] @ out), (a1, b1, a2, b2))
            for total, grad in zip(sums, grads, strict=True):
                total += q[t].view(-1, 1, 1) * grad
    mass = k * q.sum(0)
    return [total / mass.view(-1, 1, 1) for total in sums], routing, q


@pytest.mark.parametrize("kernel", ["loop", "grouped-emulated"])
def test_missed_token_directions_and_steps_equal_a_per_token_reference(kernel, monkeypatch):
    """The native kernel's missed-token sums give the float64 per-token definition's directions and steps."""
    import ubsmoe.smoe.native_layer as native_layer

    if kernel == "grouped-emulated":  # the grouped path's plan and masking, in float64
        monkeypatch.setattr(
            native_layer, "products_class", lambda *_: lambda plan: GroupedProducts(plan, mm=emulated_grouped_mm)
        )
    block = sharp_block(seed=6, expert_kernel="grouped")
    block.set_k(2)
    x, mask, dy = inputs(torch.float64, seed=7)
    block.token_mask = mask
    (block(x) * dy).sum().backward()
    expected, routing, q = per_token_reference(block, x.reshape(-1, HIDDEN), dy.reshape(-1, HIDDEN), mask.reshape(-1))
    directions = block.pg_sink.directions()
    for got, want in zip(directions, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    c = block.counters("step")
    coefficients = pseudo_gradient_coefficients(
        c["tokens"], c["inactive_mass"], c["active_mass"], c["active_assignments"], block.k, 0.5
    )
    assert float(c["tokens"]) == int(mask.sum())
    for step, want in zip(missed_token_steps(block.pg_sink, coefficients), expected, strict=True):
        flat = want.reshape(want.shape[0], -1)
        scale = coefficients / flat.square().mean(1).sqrt()
        torch.testing.assert_close(step, -want * scale.view(-1, 1, 1), rtol=1e-10, atol=1e-14)
    block.reset_step()
    assert block.pg_sink is None


def test_missed_tokens_is_the_native_default_and_shared_mean_collects_nothing():
    block = sharp_block(seed=8)
    block.set_k(1)
    x, mask, dy = inputs(torch.float64)
    (block(x) * dy).sum().backward()
    assert block.pg_sink is not None and block.pg_sink.mass is not None
    off = sharp_block(seed=8, pg_expert_sink=False)  # method.pg.expert_mode=shared_mean
    off.set_k(1)
    (off(x) * dy).sum().backward()
    assert off.pg_sink is None


def test_native_candidates_follow_num_candidates_as_on_encoders():
    """method.dmr.num_candidates = 3 at K = 1 gives 3 candidates (not ceil(np_ratio K) = 2); max(K, N_p) above."""
    block = sharp_block(seed=9, num_candidates=3, np_ratio=2.0)
    block.eval()
    block.set_k(1)
    assert block.num_candidates() == 3
    x = torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        block.phi.zero_()
        raw = block.route(x)[0].logits
        ranked = raw.topk(3, dim=-1).indices
        block.phi.fill_(0.25)
        routing, _ = block.route(x)
        assert bool(((routing.logits != raw).sum(-1) == 3).all())  # phi acts on exactly the top 3
        for t in range(x.shape[0]):  # push each token's top two far down: its third candidate wins
            block.phi.zero_()
            block.phi[ranked[t, :2]] = -50.0
            routing, _ = block.route(x[t : t + 1])
            assert int(routing.experts[0, 0]) == int(ranked[t, 2])
    block.set_k(TOP_K)
    assert block.num_candidates() == TOP_K  # max(K_c, N_p)
    relative = sharp_block(seed=9, np_ratio=2.0)
    relative.set_k(1)
    assert relative.num_candidates() == 2  # num_candidates=None: ceil(np_ratio * K_c)


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_gate_norm_at_k_below_top_k(family):
    """renormalize: the K_c gates sum to 1 per token; model: the family's rule (OLMoE keeps the raw mass)."""
    x = torch.randn(12, HIDDEN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gates = {}
    for gate_norm in ("model", "renormalize"):
        block = sharp_block(family, seed=10, gate_norm=gate_norm, dmr=False)
        block.set_k(2)
        with torch.no_grad():
            routing, gates[gate_norm] = block.route(x)
        raw = routing.probs.gather(-1, routing.experts)
        if gate_norm == "renormalize" or family == "qwen3_moe":
            torch.testing.assert_close(gates[gate_norm], raw / raw.sum(-1, keepdim=True), rtol=1e-14, atol=0)
            torch.testing.assert_close(gates[gate_norm].sum(-1), torch.ones(12, dtype=torch.float64))
        else:
            torch.testing.assert_close(gates[gate_norm], raw, rtol=0, atol=0)
            assert bool((gates[gate_norm].sum(-1) < 1 - 1e-12).all())
    assert torch.equal(gates["model"], gates["renormalize"]) == (family == "qwen3_moe")


def test_model_applies_native_missed_token_steps_after_the_optimizer_step():
    """FederatedModel on a native decoder: starved experts' LoRA moves only by PG's step, after AdamW's."""
    from ubsmoe.backbones import build_adapter
    from ubsmoe.backbones.tiny import tiny_tokenizer
    from ubsmoe.model import FederatedModel
    from ubsmoe.settings import LoraSettings, MethodSettings, ModelSettings
    from ubsmoe.tasks.instruction import InstructionTask

    tok = tiny_tokenizer()
    task = InstructionTask(tokenizer=tok, answer_patterns={}, answer_words={}, eval_mode="likelihood")
    settings = ModelSettings(
        name="tiny_olmoe", backbone="tiny:olmoe", adapter="native",
        lora=LoraSettings(rank=4, alpha=8, attention_targets=["q_proj", "v_proj"]),
    )  # fmt: skip
    module = FederatedModel(
        adapter=build_adapter("native"), task=task, model=settings, method=MethodSettings(), num_tiers=1, init_seed=0
    )  # fmt: skip
    # 2 + 3 real tokens at K = 1 (right padding): at most 5 of the 8 experts get one
    batch = {
        "input_ids": torch.tensor([[5, 6, 0], [7, 8, 9]]),
        "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
        "labels": torch.tensor([[5, 6, -100], [7, 8, 9]]),
    }
    module.train()
    module.set_client(k=1)
    module.set_token_mask(batch["attention_mask"].bool())
    with torch.no_grad():  # B != 0, so that every LoRA tensor gets gradients and directions
        for block in module.blocks.values():
            block.lora.lora_B1.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
            block.lora.lora_B2.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    optimizer = module.configure_optimizers()
    before = {name: [t.detach().clone() for t in b.lora.tensors()] for name, b in module.blocks.items()}
    module.training_step(batch, 0).backward()
    starved = {name: b.counters("step")["expert_tokens"] == 0 for name, b in module.blocks.items()}
    sinks = {name: b.pg_sink for name, b in module.blocks.items()}
    module.on_after_backward()
    assert all(sink is not None for sink in sinks.values()) and len(module._pending_pg_steps) == len(module.blocks)
    for name, block in module.blocks.items():  # a starved expert has no gradient of its own
        for t in block.lora.tensors():
            assert torch.count_nonzero(t.grad[starved[name]]) == 0
    optimizer.step()
    moved = 0
    for name, block in module.blocks.items():
        for old, new in zip(before[name], block.lora.tensors(), strict=True):
            moved += int(torch.count_nonzero(new.detach()[starved[name]] - old[starved[name]]) > 0)
    assert any(bool(s.any()) for s in starved.values()) and moved > 0
    assert module._pending_pg_steps == []
