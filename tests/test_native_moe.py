"""Native backbone adapter on tiny random OLMoE / Qwen2-MoE / Qwen3-MoE / Mixtral (CPU, offline)."""

from __future__ import annotations

import pytest
import torch

from ubsmoe.backbones.native_convert import convert, k_for_beta, native_blocks
from ubsmoe.backbones.tiny import FAMILIES, tiny_config, tiny_model, tiny_tokenizer
from ubsmoe.errors import ConfigError
from ubsmoe.smoe.lora import inject_peft_lora
from ubsmoe.smoe.native_layer import NativeSparseMoE
from ubsmoe.smoe.pseudo_grad import add_expert_pseudo_gradients, pseudo_gradient_coefficients

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def sharpen_routers(model, seed: int = 5, std: float = 1.0) -> None:
    """Random routers with decisive logits (the HF init is near-uniform), so K matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, std, generator=g)


def token_ids(batch: int = 3, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (batch, length), generator=torch.Generator().manual_seed(seed))


def storage_pointers(experts, router) -> tuple[int, int, int]:
    return experts.gate_up_proj.data_ptr(), experts.down_proj.data_ptr(), router.weight.data_ptr()


def attention_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in ATTENTION]


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_at_top_k_equals_hf_and_shares_storage(family):
    """K = top_k, phi = 0, LoRA B = 0: the HF logits (<= 1e-5) and greedy tokens; experts by reference."""
    model = tiny_model(family, seed=1)
    sharpen_routers(model)
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    pointers = {i: storage_pointers(layer.mlp.experts, layer.mlp.gate) for i, layer in enumerate(model.model.layers)}

    assert convert(model, lora_rank=4, generator=torch.Generator().manual_seed(0)) is model
    blocks = native_blocks(model)
    assert len(blocks) == len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        block = layer.mlp
        assert isinstance(block, NativeSparseMoE)
        assert block.k == block.k_max == model.config.num_experts_per_tok
        assert storage_pointers(block.experts, block.router) == pointers[i]
    assert (family == "qwen2_moe") == all(b.shared_expert is not None for b in blocks.values())
    assert model.config.output_router_logits is False
    with torch.no_grad():
        got = model(ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), generated)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_and_frozen_tensors_get_the_right_gradients(family):
    model = tiny_model(family, seed=2)
    sharpen_routers(model)
    convert(model, lora_rank=4, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    inject_peft_lora(model, attention_names(model), rank=4, alpha=8, dropout=0.0, generator=generator)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1, generator=g)
    for name, p in model.named_parameters():  # peft's injection froze everything else, as the model re-groups
        if "lora_" in name or name.endswith((".router.weight", ".phi")):
            p.requires_grad_(True)
    model.train()
    ids = token_ids()
    model(ids, labels=ids).loss.backward()
    for block in native_blocks(model).values():
        assert block.experts.gate_up_proj.grad is None and not block.experts.gate_up_proj.requires_grad
        assert block.experts.down_proj.grad is None and not block.experts.down_proj.requires_grad
        assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0
        assert block.phi.grad is not None and block.phi.grad.abs().sum() > 0
        for t in block.lora.tensors():
            assert t.grad is not None and t.grad.abs().sum() > 0
        if block.shared_expert is not None:
            assert all(p.grad is None for p in block.shared_expert.parameters())
    attention_lora = [p for n, p in model.named_parameters() if "lora_" in n and "self_attn" in n]
    assert len(attention_lora) == 2 * len(ATTENTION) * len(model.model.layers)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attention_lora)
    embeddings = model.get_input_embeddings().weight
    assert embeddings.grad is None and not embeddings.requires_grad


@pytest.mark.parametrize("family", FAMILIES)
def test_k_below_top_k_runs_k_experts_per_real_token_and_skips_padding(family):
    model = tiny_model(family, seed=3, num_experts_per_tok=4)
    sharpen_routers(model)
    convert(model, lora_rank=2)
    ids = token_ids(batch=2, length=7)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 4:] = False
    blocks = native_blocks(model)
    for k in (1, 3):
        for block in blocks.values():
            block.set_k(k)
            block.token_mask = mask
            block.reset_telemetry()
        with torch.no_grad():
            model(ids, attention_mask=mask.long())
        for block in blocks.values():
            c = block.counters("tel")
            real = int(mask.sum())
            assert float(c["tokens"]) == real
            assert float(c["expert_tokens"].sum()) == real * k
            assert float(c["active_assignments"]) == real * k
            assert 0 < float(c["active_mass"]) <= real + 1e-9
            assert float(c["active_mass"] + c["inactive_mass"].sum()) == pytest.approx(real, rel=1e-12)


def test_block_output_at_k_follows_the_family_gating_rule():
    """At K < top_k the gates are the top-K softmax probabilities, renormalised iff the config says so."""
    for family, renormalised in (("olmoe", False), ("qwen3_moe", True), ("mixtral", True)):
        model = tiny_model(family, seed=4, num_experts_per_tok=4)
        sharpen_routers(model)
        layer = model.model.layers[0]
        experts, router = layer.mlp.experts, layer.mlp.gate
        convert(model, lora_rank=0, dmr=False)
        block = layer.mlp
        block.set_k(2)
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        block.double()
        with torch.no_grad():
            y = block(x[None])[0]
            probs = torch.softmax(x @ router.weight.t(), dim=-1)
            top, idx = probs.topk(2, dim=-1)
            if renormalised:
                top = top / top.sum(-1, keepdim=True)
            ref = torch.zeros_like(x)
            for t in range(x.shape[0]):
                for j in range(2):
                    e = int(idx[t, j])
                    gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
                    ref[t] += top[t, j] * (experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_pg_router_signal_and_expert_signal():
    """Inactive experts' router rows learn through D_i; the model's PG expert call works on the stacks."""
    model = tiny_model("olmoe", seed=5)
    sharpen_routers(model)
    convert(model, lora_rank=2, dmr=False)
    block = model.model.layers[1].mlp
    block.set_k(1)
    with torch.no_grad():  # B != 0 so that A gets real gradients too
        block.lora.lora_B1.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
        block.lora.lora_B2.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    model.train()
    ids = token_ids()

    def step(batch, pg_router):
        model.zero_grad()
        block.reset_step()
        block.options.pg_router = pg_router
        model(batch, labels=batch).loss.backward()
        return block.router.weight.grad.clone()

    step(ids, pg_router=True)  # fills D_i for the experts that got tokens
    assert bool(block.pg_default_ready.any())
    assert torch.equal(block.pg_default_ready, block.counters("step")["expert_tokens"] > 0)
    assert not torch.allclose(step(ids, pg_router=False), step(ids, pg_router=True))

    short = token_ids(batch=1, length=3)  # 3 tokens at K = 1: at most 3 of 8 experts get one
    step(short, pg_router=True)
    c = block.counters("step")
    idle = c["expert_tokens"] == 0
    assert bool(idle.any())
    coefficients = pseudo_gradient_coefficients(
        c["tokens"], c["inactive_mass"], c["active_mass"], c["active_assignments"], block.k, 1.0
    )
    before = [t.grad.clone() for t in block.lora.tensors()]
    add_expert_pseudo_gradients(block.lora.tensors(), c["expert_tokens"], coefficients)
    for b, t in zip(before, block.lora.tensors(), strict=True):  # experts without tokens now get a gradient
        assert b[idle].abs().sum() == 0 and t.grad[idle].abs().sum() > 0


def test_phi_pulls_a_candidate_expert_into_the_active_set():
    model = tiny_model("olmoe", seed=6)
    sharpen_routers(model, std=0.05)
    convert(model, lora_rank=0, np_ratio=8.0)
    block = model.model.layers[0].mlp
    block.set_k(1)
    with torch.no_grad():
        block.phi[3] = 50.0
        block.reset_telemetry()
        model(token_ids())
    c = block.counters("tel")
    assert float(c["expert_tokens"][3]) == float(c["tokens"])


def test_k_for_beta():
    assert [k_for_beta(8, b) for b in (0.25, 0.5, 0.75, 1.0)] == [2, 4, 6, 8]
    assert k_for_beta(2, 0.25) == 1 and k_for_beta(100, 0.29) == 29
    with pytest.raises(ConfigError):
        k_for_beta(8, 0.0)


def test_bad_inputs_raise_clear_errors():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    dense = LlamaForCausalLM(config)
    with pytest.raises(ConfigError, match="model_type"):
        convert(dense)
    with pytest.raises(ConfigError, match="model.k_max"):
        convert(tiny_model("olmoe"), k_max=9)
    model = convert(tiny_model("mixtral"), k_max=8)
    block = model.model.layers[0].mlp
    assert block.k == 2
    block.set_k(8)
    with pytest.raises(ValueError, match="k_max=8"):
        block.set_k(9)
    with pytest.raises(ValueError):
        block.set_k(0)
    block.token_mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="token_mask"):
        model(token_ids())
    with pytest.raises(ValueError, match="already converted"):
        convert(model)


def test_tiny_tokenizer_encodes_any_text_and_pads_both_sides():
    tok = tiny_tokenizer()
    text = "Below is an instruction. Answer: option2 — naïve café ✓"
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok) <= tiny_config("olmoe").vocab_size
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    batch = tok(["ab", "abcd"], padding=True)
    assert batch.input_ids[0][-2:] == [0, 0]
    tok.padding_side = "left"
    batch = tok(["ab", "abcd"], padding=True)
    assert batch.input_ids[0][:2] == [0, 0] and batch.attention_mask[0] == [0, 0, 1, 1]
    trained = tiny_tokenizer(["the answer is true", "the answer is false"] * 5, vocab_size=300)
    again = tiny_tokenizer(["the answer is true", "the answer is false"] * 5, vocab_size=300)
    assert trained.get_vocab() == again.get_vocab()
    assert len(trained("the answer is true").input_ids) < len("the answer is true")


@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_flops_at_k_equal_flop_counter(family):
    """Analytic forward FLOPs (attention + router + K SwiGLU experts + shared expert + LoRA) = FlopCounterMode's."""
    from ubsmoe.backbones.native_convert import decoder_dims
    from ubsmoe.smoe.flops import decoder_flops_per_token, measure_flops

    model = tiny_model(family, seed=7, num_experts_per_tok=4)
    sharpen_routers(model)
    convert(model, lora_rank=4)
    names = attention_names(model)
    inject_peft_lora(model, names, rank=4, alpha=8, dropout=0.0)
    layer0 = {n.split(".")[-1]: m for n, m in model.named_modules() if n in names and ".layers.0." in f".{n}."}
    shapes = tuple((layer0[t].in_features, layer0[t].out_features) for t in ATTENTION)
    dims = decoder_dims(model.config, attention_lora=shapes)
    assert model.config._attn_implementation == "eager"
    batch, length = 2, 8
    ids = token_ids(batch=batch, length=length)
    previous = None
    for k in (4, 2, 1):
        for block in native_blocks(model).values():
            block.set_k(k)
        with torch.no_grad():
            measured = measure_flops(lambda: model(ids))
        analytic = decoder_flops_per_token(dims, length, k=k, lora_rank=4) * batch * length
        assert measured == analytic
        if previous is not None:
            assert analytic < previous
        previous = analytic


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_kernel_matches_autograd_reference(family):
    """The hand-written backward gives autograd's values and gradients (x, router, phi, expert LoRA), float64."""
    results = []
    for dispatch in ("sorted", "autograd"):
        model = tiny_model(family, seed=8, num_experts_per_tok=4)
        sharpen_routers(model)
        convert(model, lora_rank=3, generator=torch.Generator().manual_seed(0))
        block = model.model.layers[0].mlp.double()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for t in (*block.lora.tensors(), block.phi, block.pg_default):
                t.normal_(0.0, 0.5, generator=g)
            block.pg_default_ready.fill_(True)
        block.dispatch = dispatch
        block.set_k(2)
        block.train()
        x = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[1, 3:] = False
        block.token_mask = mask
        y = block(x)
        weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
        (y * weight).sum().backward()
        grads = [x.grad, block.router.weight.grad, block.phi.grad, *(t.grad for t in block.lora.tensors())]
        if block.shared_expert is None:  # padding is never routed: nothing but the shared expert reaches it
            assert torch.equal(y[1, 3:], torch.zeros_like(y[1, 3:]))
        results.append((y.detach(), grads, block.pg_default.clone(), block.counters("step")))
    (y0, g0, d0, c0), (y1, g1, d1, c1) = results
    torch.testing.assert_close(y0, y1, rtol=1e-12, atol=1e-12)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d0, d1, rtol=1e-12, atol=1e-12)
    for key in c0:
        torch.testing.assert_close(c0[key], c1[key])


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_estimate_counts_match_the_real_tiny_model(family):
    """Parameter and adapter counts of the estimate equal the converted tiny model's; the byte arithmetic adds up."""
    from ubsmoe.backbones.memory import GiB, estimate_memory

    config = tiny_config(family)
    model = tiny_model(family)
    total = sum(p.numel() for p in model.parameters())
    convert(model, lora_rank=4)
    inject_peft_lora(model, attention_names(model), rank=4, alpha=8, dropout=0.0)
    params = dict(model.named_parameters())
    adapters = sum(p.numel() for n, p in params.items() if "lora_" in n or n.endswith(".phi"))
    routers = sum(p.numel() for n, p in params.items() if n.endswith(".router.weight"))

    est = estimate_memory(config, k=1, lora_rank=4, overhead_gib=0.5)
    assert est.params_total == total
    assert est.trainable_adapters == adapters and est.trainable_router == routers
    layers, experts, h, d = 2, 8, 64, 32
    assert est.params_active == total - layers * (experts - 1) * 3 * h * d  # K = 1: 7 experts idle per layer
    assert est.weights_bytes == 2 * total
    assert est.trainable_bytes == 16 * adapters + 6 * routers
    budget = 1.0 * GiB
    fit = est.max_tokens(budget)
    assert est.total_bytes(fit) <= budget < est.total_bytes(fit + 1)
    full = estimate_memory(config, lora_rank=4)  # K = top_k = 2
    assert full.per_token_bytes > est.per_token_bytes
    assert estimate_memory(config, lora_rank=4, gradient_checkpointing=True).per_token_bytes < full.per_token_bytes


def test_activation_checkpointing_gives_the_same_step():
    """The recomputed forward neither double-counts nor re-updates D_i; gradients equal the plain step's."""
    results = []
    for checkpointing in (False, True):
        model = tiny_model("qwen2_moe", seed=9, num_experts_per_tok=4)
        sharpen_routers(model)
        convert(model, lora_rank=2)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for block in native_blocks(model).values():
                block.set_k(2)
                block.lora.lora_B1.normal_(0.0, 0.1, generator=g)
                block.pg_default.normal_(0.0, 1.0, generator=g)  # earlier rounds' D_i
                block.pg_default_ready.fill_(True)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        ids = token_ids()
        model(ids, labels=ids).loss.backward()
        blocks = native_blocks(model).values()
        results.append(
            (
                [t.grad.clone() for b in blocks for t in (b.router.weight, b.phi, *b.lora.tensors())],
                [b.pg_default.clone() for b in blocks],
                [b.counters("step")["expert_tokens"].clone() for b in blocks],
                [float(b.counters("tel")["tokens"]) for b in blocks],
            )
        )
    (g0, d0, c0, n0), (g1, d1, c1, n1) = results
    assert n0 == n1 == [27.0, 27.0]
    for a, b in zip(c0 + d0, c1 + d1, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("family", "router_dtype"), [("olmoe", None), ("qwen2_moe", torch.float32)])
def test_bf16_model_keeps_fp32_adapters_and_matches_hf(family, router_dtype):
    """A model loaded in bf16 (as on a GPU) converts: HF's bf16 logits, fp32 adapters with finite gradients."""
    model = tiny_model(family, seed=1).to(torch.bfloat16)
    sharpen_routers(model)
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids).logits.float()
    convert(model, lora_rank=4, router_dtype=router_dtype)
    for block in native_blocks(model).values():
        assert block.router.weight.dtype == (router_dtype or torch.bfloat16) and block.router.weight.requires_grad
    with torch.no_grad():
        got = model(ids).logits.float()
    assert (got - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()
    model.train()
    model(ids, labels=ids).loss.backward()
    for block in native_blocks(model).values():
        assert block.experts.gate_up_proj.dtype == torch.bfloat16
        for t in block.lora.tensors():
            assert t.dtype == torch.float32 and t.grad.dtype == torch.float32 and bool(torch.isfinite(t.grad).all())
        assert bool(block.pg_default_ready.any()) and bool(torch.isfinite(block.pg_default).all())
        assert block.router.weight.grad.dtype == block.router.weight.dtype


def test_left_padded_generation_and_token_mask_keep_real_tokens_exact():
    """Batched left-padded greedy generation equals HF's; a token_mask leaves real tokens' logits unchanged."""
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    model = tiny_model("qwen2_moe", seed=3)
    sharpen_routers(model)
    batch = tok(["Question: is the sky blue? Answer:", "Hi"], padding=True, return_tensors="pt")
    expected = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    convert(model)
    assert torch.equal(model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id), expected)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        unmasked = model(**batch).logits
        for block in native_blocks(model).values():
            block.token_mask = mask
        masked = model(**batch).logits
    assert (masked[mask] - unmasked[mask]).abs().max().item() <= 1e-5


def test_balance_loss_and_tier_scale():
    """balance_loss: the Switch loss of this step's routing, with a router gradient; tier_scale scales the routed part."""
    from ubsmoe.smoe.routing import switch_balance_loss

    model = tiny_model("qwen2_moe", seed=10, num_experts_per_tok=4)
    sharpen_routers(model)
    convert(model, lora_rank=0, dmr=False, balance_loss=True, num_tiers=2)
    block = model.model.layers[0].mlp
    block.set_k(2)
    block.train()
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    block(x)
    probs = torch.softmax(x[0] @ block.router.weight.t(), dim=-1)
    counts = torch.bincount(probs.topk(2, dim=-1).indices.reshape(-1), minlength=8)
    torch.testing.assert_close(block.aux_loss, switch_balance_loss(probs, counts, 2))
    block.aux_loss.backward()
    assert block.router.weight.grad.abs().sum() > 0
    block.eval()
    with torch.no_grad():
        block.tier_scale[1] = 0.0
        block.tier_index = 1
        shared_only = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        torch.testing.assert_close(block(x), shared_only)
        assert block.aux_loss is None  # only in training


def test_grouped_mm_products_match_the_loop():
    """The grouped_mm products (the default on CUDA) give the loop's values and gradients (float32, on CPU)."""
    from ubsmoe.smoe.native_kernels import grouped_mm_supported

    results = []
    for kernel in ("loop", "grouped"):
        model = tiny_model("olmoe", seed=11, num_experts_per_tok=4)
        sharpen_routers(model)
        convert(model, lora_rank=4, expert_kernel=kernel)
        block = model.model.layers[0].mlp
        assert block.expert_kernel == kernel
        with torch.no_grad():
            for t in block.lora.tensors():
                t.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
        block.set_k(1)  # 1 of 8 experts for 6 real tokens: some experts get no row
        block.train()
        x = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
        block.token_mask = torch.tensor([[True] * 6 + [False] * 2])
        y = block(x)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
        assert bool((block.counters("step")["expert_tokens"] == 0).any())
        results.append([y.detach(), x.grad, block.router.weight.grad, *(t.grad for t in block.lora.tensors()), block.pg_default])
    assert grouped_mm_supported(torch.zeros(2, 64), block.lora.lora_B1)
    for a, b in zip(*results, strict=True):  # float32, summation order differs: tolerance scaled to magnitude
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_active_experts_stay_inside_the_dmr_candidates():
    """A(x) = top K of the modulated logits among T(x): a large negative phi cannot let a non-candidate in."""
    model = tiny_model("olmoe", seed=12, num_experts_per_tok=2)
    sharpen_routers(model)
    convert(model, lora_rank=0, np_ratio=2.0)  # K = 2 -> N_p = 4 of 8 candidates
    block = model.model.layers[0].mlp
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        candidates = (x @ block.router.weight.t()).topk(4, dim=-1).indices
        block.phi.fill_(-50.0)  # every candidate pushed far below every non-candidate
        routing, gates = block.route(x)
    for t in range(x.shape[0]):
        assert set(routing.experts[t].tolist()) <= set(candidates[t].tolist())
    torch.testing.assert_close(gates, routing.probs.gather(-1, routing.experts))
