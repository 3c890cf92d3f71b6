"""One OLMoE-1B-7B MoE layer on a GPU: the converted block (grouped / loop, K = 8 / 2) against Hugging Face's.

The layer has OLMoE-1B-7B's shapes (hidden 2048, 64 experts of width 1024, top-8), random
bf16 weights, a float32 router and LoRA r = 16; the input is 16 x 256 tokens. Each
configuration times the block's forward and backward alone with CUDA events (median of 10
after 3 warm-ups, in ms): Hugging Face's block with peft LoRA on the experts
(``target_parameters``) and without, with its default and its ``grouped_mm`` experts; the
converted block at K = 8 and K = 2 with the grouped products (``model.expert_kernel=auto``),
with and without the PG missed-token sums, with 22% padding, and with the per-expert loop.
Then a CUDA profile of one converted K = 2 and K = 8 step. Needs CUDA; run by hand:
``PYTHONPATH=src python benchmarks/native_moe_layer_gpu.py`` (writes
``logs/bench/native_moe_layer_gpu.json``). Results: docs/performance.md.
"""

import json
import os
import statistics

import torch

from peft import LoraConfig, inject_adapter_in_model
from transformers import AutoModelForCausalLM, OlmoeConfig

from ubsmoe.backbones.native_convert import convert

RANK = 16
N = 16 * 256
OUT = os.environ.get("OUT", "logs/bench")


def config(layers=1, vocab=50304):
    return OlmoeConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                       max_position_embeddings=4096, pad_token_id=1, bos_token_id=None, eos_token_id=50279)


def model(layers=1, vocab=50304):
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(config(layers, vocab), dtype=torch.bfloat16, attn_implementation="sdpa")
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.02)
    m.requires_grad_(False)
    return m


def hf_block(impl=None, lora=True):
    m = model()
    if impl is not None:
        m.config._experts_implementation = impl
        for mod in m.modules():
            if hasattr(mod, "config"):
                mod.config._experts_implementation = impl
    if lora:
        cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=[],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        inject_adapter_in_model(cfg, m)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n or n.endswith("mlp.gate.weight"))
    return m.model.layers[0].mlp


def native_block(k, kernel="auto", sink=True):
    m = model()
    convert(m, lora_rank=RANK, lora_alpha=2 * RANK, router_dtype=torch.float32, expert_kernel=kernel,
            pg_expert_sink=sink)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n or n.endswith((".router.weight", ".phi")))
    block = m.model.layers[0].mlp
    block.set_k(k)
    return block.train()


def timeit(block, x, mask=None, reps=10, warm=3):
    if hasattr(block, "token_mask"):
        block.token_mask = mask
    times = []
    for i in range(warm + reps):
        xg = x.detach().requires_grad_(True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = block(xg)
        y.float().square().mean().backward()
        end.record()
        torch.cuda.synchronize()
        if i >= warm:
            times.append(start.elapsed_time(end))
        for p in block.parameters():
            p.grad = None
        if hasattr(block, "reset_step"):
            block.reset_step()
    return statistics.median(times)


def main():
    x = torch.randn(16, 256, 2048, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(16, 256, dtype=torch.bool, device="cuda")
    mask[:, 200:] = False  # ~22% padding
    res = {"grouped_mm": hasattr(torch.nn.functional, "grouped_mm"), "torch": torch.__version__}
    cases = [
        ("native_k8_auto", lambda: native_block(8)),
        ("native_k2_auto", lambda: native_block(2)),
        ("native_k8_auto_nosink", lambda: native_block(8, sink=False)),
        ("native_k2_auto_nosink", lambda: native_block(2, sink=False)),
        ("native_k8_loop", lambda: native_block(8, "loop")),
        ("native_k2_loop", lambda: native_block(2, "loop")),
        ("hf_lora_default", lambda: hf_block()),
        ("hf_bare_default", lambda: hf_block(lora=False)),
        ("hf_lora_grouped_mm", lambda: hf_block("grouped_mm")),
        ("hf_bare_grouped_mm", lambda: hf_block("grouped_mm", lora=False)),
    ]
    for name, make in cases:
        try:
            block = make()
            res[name] = timeit(block, x)
            if name.startswith("native_k8_auto") or name.startswith("native_k2_auto"):
                res[name + "_padded"] = timeit(block, x, mask)
            del block
        except Exception as err:  # noqa: BLE001 - report and go on
            res[name] = f"error: {type(err).__name__}: {err}"[:300]
        torch.cuda.empty_cache()
        print(name, res.get(name), flush=True)
    # profile where the time goes in native K=2 and K=8 (one fwd+bwd)
    for k in (2, 8):
        block = native_block(k)
        timeit(block, x, reps=1, warm=2)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            timeit(block, x, reps=1, warm=0)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18)
        print(f"--- native k={k}\n{table}", flush=True)
        del block
        torch.cuda.empty_cache()
    print(json.dumps(res, indent=1))
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "native_moe_layer_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
