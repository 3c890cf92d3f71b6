"""Training-step speed of a converted native MoE decoder at K = 2 and K = 8 against Hugging Face's own.

One run, side by side, on a random OLMoE-style decoder. ``--dims tiny`` (the default) is a
mid-size one for a CPU (hidden 512, 4 layers, 64 experts, top-8, expert width 256, vocab
4096; batch 8 x 128 tokens); ``--dims olmoe-1b-7b`` has OLMoE-1B-7B-0125's layer shapes
(hidden 2048, 64 experts of width 1024, top-8, vocab 50304, 16 heads;
:mod:`ubsmoe.backbones.random_checkpoint`) with 2 layers and batch 16 x 256 tokens, for a
GPU. ``--dtype bfloat16`` loads the weights in bf16 and runs forward under bf16 autocast
(adapters in float32), as ``fabric=gpu`` (bf16-mixed) trains. A training step is forward,
backward (causal-LM loss), the PG expert signal (converted model) and AdamW on the
trainable tensors of the configurations in ``--kinds``:

- ``hf``: the unconverted model at its top-8, with comparable adapters from peft: LoRA on
  q/k/v/o and, through ``target_parameters``, on every expert's ``gate_up_proj`` and
  ``down_proj``; the router trainable too;
- ``hf_top2``: the same with the model's config set to top-2 (Hugging Face's own block at K = 2);
- ``hf_attn_lora``: ``hf`` without expert LoRA (attention LoRA and router only), i.e.
  Hugging Face's MoE block at its bare cost, for context;
- ``native_k8`` / ``native_k2``: the model converted by :func:`ubsmoe.backbones.native_convert.convert`
  (UB-SMoE defaults: DMR, PG's expert signal in its missed-token form, expert LoRA on the
  routed rows) with peft LoRA on q/k/v/o, at K = 8 and K = 2, with the default expert kernel
  (``model.expert_kernel=auto``: grouped products on CUDA, the per-expert loop on CPU);
- ``native_k8_gmm`` / ``native_k2_gmm``: the same with the grouped kernel forced
  (``torch.nn.functional.grouped_mm`` for all experts where torch has it).

The default ``--kinds`` are ``hf,hf_attn_lora,native_k8,native_k2``. A configuration that
fails to build or to run is reported under ``errors`` in the JSON and left out of the rest.

Configurations are interleaved step by step, so load from other processes on the shared CPU
hits all of them alike; figures are medians after warm-up. The MoE layers' share is timed
separately: each layer's MoE block alone, forward and backward on the hidden states that
reach it in a real forward pass (the step without it is attention, norms, head, optimizer).
On CUDA each step's peak memory above what was allocated before it is recorded too.

Targets: ``native_k8`` within 1.15x of ``hf``; ``native_k2``'s MoE time at most
0.5x ``native_k8``'s. Run: ``PYTHONPATH=src .venv/bin/python benchmarks/native_moe_speed.py``
(writes ``logs/bench/native_moe_speed.json``). On a GPU: ``--dims olmoe-1b-7b --dtype bfloat16
--device cuda`` (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
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
from ubsmoe.backbones.random_checkpoint import architecture_config
from ubsmoe.smoe.lora import inject_peft_lora
from ubsmoe.smoe.pseudo_grad import missed_token_steps, pseudo_gradient_coefficients

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
KINDS = ("hf", "hf_top2", "hf_attn_lora", "native_k8", "native_k2", "native_k8_gmm", "native_k2_gmm")
DEFAULT_KINDS = "hf,hf_attn_lora,native_k8,native_k2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Per --dims: layers, batch, length defaults and the model's description in the JSON.
DIMS = {
    "tiny": {"layers": 4, "batch": 8, "length": 128,
             "model": "OLMoE-style random: hidden 512, 64 experts, top-8, expert width 256, vocab 4096"},
    "olmoe-1b-7b": {"layers": 2, "batch": 16, "length": 256,
                    "model": "OLMoE-1B-7B-0125 layer shapes, random: hidden 2048, 64 experts, top-8, "
                             "expert width 1024, vocab 50304, 16 heads"},
}  # fmt: skip
# (numerator, denominator) kinds of the ratios reported when both ran.
RATIOS = {
    "native_k8_over_hf_step": ("native_k8", "hf", "step"),
    "native_k2_over_native_k8_moe": ("native_k2", "native_k8", "moe"),
    "native_k2_over_native_k8_step": ("native_k2", "native_k8", "step"),
    "native_k8_over_hf_moe": ("native_k8", "hf", "moe"),
    "native_k8_over_hf_attn_lora_step": ("native_k8", "hf_attn_lora", "step"),
    "native_k8_over_hf_attn_lora_moe": ("native_k8", "hf_attn_lora", "moe"),
    "hf_top2_over_hf_step": ("hf_top2", "hf", "step"),
    "hf_top2_over_hf_moe": ("hf_top2", "hf", "moe"),
    "native_k2_over_hf_top2_step": ("native_k2", "hf_top2", "step"),
    "native_k2_over_hf_top2_moe": ("native_k2", "hf_top2", "moe"),
    "native_k8_gmm_over_native_k8_step": ("native_k8_gmm", "native_k8", "step"),
    "native_k8_gmm_over_native_k8_moe": ("native_k8_gmm", "native_k8", "moe"),
    "native_k2_gmm_over_native_k2_step": ("native_k2_gmm", "native_k2", "step"),
    "native_k2_gmm_over_native_k2_moe": ("native_k2_gmm", "native_k2", "moe"),
}
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def mid_config(layers: int):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=8, num_experts=64, num_experts_per_tok=8, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def model_config(dims: str, layers: int):
    if dims == "tiny":
        return mid_config(layers)
    # the byte tokenizer's special ids (the benchmark's random ids start at 3)
    return architecture_config(
        "olmoe-1b-7b", num_layers=layers, overrides={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    )


def build(kind: str, config, rank: int, device: str, dtype: torch.dtype = torch.float32):
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    if kind == "hf_top2":
        config = type(config).from_dict({**config.to_dict(), "num_experts_per_tok": 2})
    torch.manual_seed(0)
    if device == "cpu":
        model = AutoModelForCausalLM.from_config(config)
    else:  # drawn on the device: a 1B-parameter model initialises in seconds there
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    model.to(dtype)
    with torch.no_grad():  # decisive routers, as trained ones are
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.05)
    model.requires_grad_(False)
    if kind.startswith("hf"):
        experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if kind != "hf_attn_lora" else None
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ATTENTION, target_parameters=experts)
        inject_adapter_in_model(lora, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name or name.endswith("mlp.gate.weight"))
    else:
        convert(model, lora_rank=rank, lora_alpha=2 * rank, router_dtype=torch.float32)  # as model.router_dtype
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in ATTENTION]
        inject_peft_lora(model, names, rank=rank, alpha=2 * rank, dropout=0.0)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name or name.endswith((".router.weight", ".phi")))
        k = int(kind.removeprefix("native_k").removesuffix("_gmm"))
        for block in native_blocks(model).values():
            block.set_k(k)
            block.expert_kernel = "grouped" if kind.endswith("_gmm") else "auto"  # auto: grouped on CUDA, loop on CPU
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def pg_expert_signal(model) -> list:
    """What the LightningModule's ``on_after_backward`` does for a sparse block (PG's default form,
    ``missed_tokens``): each starved expert's step from its missed-token sums, applied after the
    optimizer step by :func:`apply_pg_steps`."""
    pending = []
    for block in native_blocks(model).values():
        c = block.counters("step")
        coefficients = pseudo_gradient_coefficients(
            c["tokens"], c["inactive_mass"], c["active_mass"], c["active_assignments"], block.k, 1.0
        )
        if block.pg_sink is not None and block.k < block.num_experts:
            pending.append((block, missed_token_steps(block.pg_sink, coefficients)))
        block.reset_step()
    return pending


@torch.no_grad()
def apply_pg_steps(pending: list, lr: float) -> None:
    for block, steps in pending:
        for tensor, step in zip(block.lora.tensors(), steps, strict=True):
            if step is not None:
                tensor.add_(step.to(tensor.dtype), alpha=lr)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, dtype: torch.dtype):
    """bf16 weights run under bf16 autocast (adapters stay float32), as Fabric's bf16-mixed does."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def train_step(model, optim, ids, device: str, dtype: torch.dtype = torch.float32) -> float:
    sync(device)
    start = time.perf_counter()
    with autocast(device, dtype):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    pending = pg_expert_signal(model) if native_blocks(model) else []
    optim.step()
    apply_pg_steps(pending, optim.param_groups[0]["lr"])
    optim.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def moe_inputs(
    model, ids, device: str, dtype: torch.dtype = torch.float32
) -> list[tuple[torch.nn.Module, torch.Tensor]]:
    """Each layer's MoE block with the hidden states that reach it in a forward pass."""
    captured = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0].detach().clone())))
        for layer in model.model.layers
    ]
    with torch.no_grad(), autocast(device, dtype):
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return captured


def moe_time(pairs, device: str, dtype: torch.dtype = torch.float32) -> float:
    """Forward + backward of every MoE block alone (input gradient and trainable tensors' gradients)."""
    sync(device)
    start = time.perf_counter()
    for block, x in pairs:
        xg = x.requires_grad_(True)
        with autocast(device, dtype):
            y = block(xg)
        y = y[0] if isinstance(y, tuple) else y
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


def step_memory(device: str, run):
    """``run()``'s result and, on CUDA, its peak allocation above what was allocated before (GiB)."""
    if not device.startswith("cuda"):
        return run(), None
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = run()
    return result, (torch.cuda.max_memory_allocated() - before) / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", choices=list(DIMS), default="tiny", help="layer shapes (module docstring)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights' dtype (bf16: autocast)")
    parser.add_argument("--kinds", default=DEFAULT_KINDS, help=f"comma-separated, from {','.join(KINDS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: --dims's)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: --dims's)")
    parser.add_argument("--length", type=int, default=None, help="tokens per sequence (default: --dims's)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="logs/bench/native_moe_speed.json")
    parser.add_argument("--no-malloc-tuning", action="store_true")
    args = parser.parse_args()
    if not args.no_malloc_tuning and args.device == "cpu" and any(os.environ.get(k) != v for k, v in MALLOC_TUNING.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_TUNING})
    if args.threads:
        torch.set_num_threads(args.threads)
    for key in ("layers", "batch", "length"):
        if getattr(args, key) is None:
            setattr(args, key, DIMS[args.dims][key])
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; choose from {list(KINDS)}")
    dtype = DTYPES[args.dtype]

    config = model_config(args.dims, args.layers)
    errors: dict[str, str] = {}
    models = {}
    for kind in kinds:
        try:
            models[kind] = build(kind, config, args.rank, args.device, dtype)
        except Exception as err:  # noqa: BLE001 - reported in the JSON; the other configurations still run
            errors[kind] = f"build: {type(err).__name__}: {err}"
            print(f"{kind}: {errors[kind]}", flush=True)
    kinds = [k for k in kinds if k in models]
    ids = torch.randint(3, config.vocab_size, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    steps: dict[str, list[float]] = {k: [] for k in kinds}
    moe: dict[str, list[float]] = {k: [] for k in kinds}
    memory: dict[str, list[float]] = {k: [] for k in kinds}
    pairs = {kind: moe_inputs(models[kind][0], ids, args.device, dtype) for kind in kinds}
    for rep in range(args.warmup + args.steps):
        for kind in list(kinds):
            model, optim = models[kind]
            try:
                step, peak = step_memory(args.device, lambda: train_step(model, optim, ids, args.device, dtype))
                block_time = moe_time(pairs[kind], args.device, dtype)
            except Exception as err:  # noqa: BLE001 - as above
                errors[kind] = f"rep {rep}: {type(err).__name__}: {err}"
                print(f"{kind}: {errors[kind]}", flush=True)
                kinds.remove(kind)
                del models[kind], pairs[kind], steps[kind], moe[kind], memory[kind]
                continue
            if rep >= args.warmup:
                steps[kind].append(step)
                moe[kind].append(block_time)
                if peak is not None:
                    memory[kind].append(peak)
            print(f"rep {rep} {kind}: step {step:.3f}s, MoE blocks {block_time:.3f}s", flush=True)

    median = {k: statistics.median(v) for k, v in steps.items()}
    moe_median = {k: statistics.median(v) for k, v in moe.items()}
    medians = {"step": median, "moe": moe_median}
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model": DIMS[args.dims]["model"],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "malloc": {k: os.environ.get(k) for k in MALLOC_TUNING}},  # fmt: skip
        "step_seconds_median": median,
        "moe_blocks_seconds_median": moe_median,
        "steps_seconds": steps,
        "moe_blocks_seconds": moe,
        "ratios": {
            name: medians[part][a] / medians[part][b]
            for name, (a, b, part) in RATIOS.items()
            if a in medians[part] and b in medians[part]
        },
    }
    if args.device == "cuda":
        result["machine"]["gpu"] = torch.cuda.get_device_name()
        result["machine"]["grouped_mm_in_torch"] = hasattr(torch.nn.functional, "grouped_mm")
        result["step_peak_extra_gib_max"] = {k: max(v) for k, v in memory.items() if v}
    if errors:
        result["errors"] = errors
    ratios = result["ratios"]
    result["targets"] = {
        name: ratios[key] <= bound
        for name, key, bound in (
            ("native_k8_within_1.15x_hf", "native_k8_over_hf_step", 1.15),
            ("native_k2_moe_at_most_0.5x_k8", "native_k2_over_native_k8_moe", 0.5),
        )
        if key in ratios
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"step_seconds_median": median, "moe_blocks_seconds_median": moe_median, **ratios}, indent=2))


if __name__ == "__main__":
    main()
