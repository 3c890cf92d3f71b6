"""Training-step speed of a converted native MoE decoder at K = 2 and K = 8 against Hugging Face's own.

One run, side by side, on a mid-size random OLMoE-style decoder (hidden 512, 4 layers, 64
experts, top-8, expert width 256; batch 8 x 128 tokens). A training step is forward,
backward (causal-LM loss), the PG expert signal (converted model) and AdamW on the trainable
tensors of

- ``hf``: the unconverted model at its top-8, with comparable adapters from peft: LoRA on
  q/k/v/o and, through ``target_parameters``, on every expert's ``gate_up_proj`` and
  ``down_proj``; the router trainable too;
- ``hf_attn_lora``: the same without expert LoRA (attention LoRA and router only), i.e.
  Hugging Face's MoE block at its bare cost, for context;
- ``native_k8`` / ``native_k2``: the model converted by :func:`ubsmoe.backbones.native.convert`
  (UB-SMoE defaults: DMR, PG router and expert signals, expert LoRA rank 8 on the routed rows)
  with peft LoRA on q/k/v/o, at K = 8 and K = 2.

Configurations are interleaved step by step, so load from other processes on the shared CPU
hits all of them alike; figures are medians after warm-up. The MoE layers' share is timed
separately: each layer's MoE block alone, forward and backward on the hidden states that
reach it in a real forward pass (the step without it is attention, norms, head, optimizer).

Targets (issue 10): ``native_k8`` within 1.15x of ``hf``; ``native_k2``'s MoE time at most
0.5x ``native_k8``'s. Run: ``PYTHONPATH=src .venv/bin/python benchmarks/native_moe_speed.py``
(writes ``logs/bench/native_moe_speed.json``). On a GPU it runs there (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ubsmoe.backbones.native_convert import convert, native_blocks
from ubsmoe.smoe.lora import inject_peft_lora
from ubsmoe.smoe.pseudo_grad import add_expert_pseudo_gradients, pseudo_gradient_coefficients

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def mid_config(layers: int):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=8, num_experts=64, num_experts_per_tok=8, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def build(kind: str, layers: int, rank: int, device: str):
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    config = mid_config(layers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # decisive routers, as trained ones are
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.05)
    model.requires_grad_(False)
    if kind.startswith("hf"):
        experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if kind == "hf" else None
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ATTENTION, target_parameters=experts)
        inject_adapter_in_model(lora, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name or name.endswith("mlp.gate.weight"))
    else:
        convert(model, lora_rank=rank, lora_alpha=2 * rank)
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in ATTENTION]
        inject_peft_lora(model, names, rank=rank, alpha=2 * rank, dropout=0.0)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name or name.endswith((".router.weight", ".phi")))
        k = int(kind.removeprefix("native_k"))
        for block in native_blocks(model).values():
            block.set_k(k)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def pg_expert_signal(model) -> None:
    """What the LightningModule's ``on_after_backward`` does for a sparse block."""
    for block in native_blocks(model).values():
        c = block.counters("step")
        coefficients = pseudo_gradient_coefficients(
            c["tokens"], c["inactive_mass"], c["active_mass"], c["active_assignments"], block.k, 1.0
        )
        add_expert_pseudo_gradients(block.lora.tensors(), c["expert_tokens"], coefficients)
        block.reset_step()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model, optim, ids, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if native_blocks(model):
        pg_expert_signal(model)
    optim.step()
    optim.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def moe_inputs(model, ids) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Each layer's MoE block with the hidden states that reach it in a forward pass."""
    captured = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0].detach().clone())))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return captured


def moe_time(pairs, device: str) -> float:
    """Forward + backward of every MoE block alone (input gradient and trainable tensors' gradients)."""
    sync(device)
    start = time.perf_counter()
    for block, x in pairs:
        xg = x.requires_grad_(True)
        y = block(xg)
        y.backward(torch.ones_like(y))
    sync(device)
    elapsed = time.perf_counter() - start
    for block, x in pairs:
        x.grad = None
        for p in block.parameters():
            p.grad = None
        if hasattr(block, "reset_step"):
            block.reset_step()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="logs/bench/native_moe_speed.json")
    parser.add_argument("--no-malloc-tuning", action="store_true")
    args = parser.parse_args()
    if not args.no_malloc_tuning and args.device == "cpu" and any(os.environ.get(k) != v for k, v in MALLOC_TUNING.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_TUNING})
    if args.threads:
        torch.set_num_threads(args.threads)

    kinds = ["hf", "hf_attn_lora", "native_k8", "native_k2"]
    models = {kind: build(kind, args.layers, args.rank, args.device) for kind in kinds}
    ids = torch.randint(3, 4096, (args.batch, args.length), generator=torch.Generator().manual_seed(0)).to(args.device)
    steps: dict[str, list[float]] = {k: [] for k in kinds}
    moe: dict[str, list[float]] = {k: [] for k in kinds}
    pairs = {kind: moe_inputs(models[kind][0], ids) for kind in kinds}
    for rep in range(args.warmup + args.steps):
        for kind in kinds:
            model, optim = models[kind]
            step = train_step(model, optim, ids, args.device)
            block_time = moe_time(pairs[kind], args.device)
            if rep >= args.warmup:
                steps[kind].append(step)
                moe[kind].append(block_time)
            print(f"rep {rep} {kind}: step {step:.3f}s, MoE blocks {block_time:.3f}s", flush=True)

    median = {k: statistics.median(v) for k, v in steps.items()}
    moe_median = {k: statistics.median(v) for k, v in moe.items()}
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model": "OLMoE-style random: hidden 512, 64 experts, top-8, expert width 256, vocab 4096",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "malloc": {k: os.environ.get(k) for k in MALLOC_TUNING}},  # fmt: skip
        "step_seconds_median": median,
        "moe_blocks_seconds_median": moe_median,
        "steps_seconds": steps,
        "moe_blocks_seconds": moe,
        "ratios": {
            "native_k8_over_hf_step": median["native_k8"] / median["hf"],
            "native_k2_over_native_k8_moe": moe_median["native_k2"] / moe_median["native_k8"],
            "native_k2_over_native_k8_step": median["native_k2"] / median["native_k8"],
            "native_k8_over_hf_moe": moe_median["native_k8"] / moe_median["hf"],
            "native_k8_over_hf_attn_lora_step": median["native_k8"] / median["hf_attn_lora"],
            "native_k8_over_hf_attn_lora_moe": moe_median["native_k8"] / moe_median["hf_attn_lora"],
        },
    }
    result["targets"] = {
        "native_k8_within_1.15x_hf": result["ratios"]["native_k8_over_hf_step"] <= 1.15,
        "native_k2_moe_at_most_0.5x_k8": result["ratios"]["native_k2_over_native_k8_moe"] <= 0.5,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"step_seconds_median": median, "moe_blocks_seconds_median": moe_median, **result["ratios"]}, indent=2))


if __name__ == "__main__":
    main()
