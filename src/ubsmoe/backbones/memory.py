"""GPU memory estimate for fine-tuning a converted native MoE decoder with UB-SMoE's adapters.

Four parts, each from the model's config alone (no weights are downloaded):

- **weights**: every parameter of the backbone in the load dtype (bf16: 2 bytes). Counted
  exactly by building the model on the ``meta`` device (no memory is allocated).
- **trainable state**: expert LoRA (gate_up and down, every expert), attention LoRA, phi
  (fp32 adapters: value + gradient + AdamW's two moments = 16 bytes each); the routers are
  the backbone's own weights (their value is counted in the weights; gradient and AdamW
  moments in the load dtype: 3 x 2 bytes).
- **activations per token** saved for backward, in the load dtype, per decoder layer: the
  attention block (norm input and output, q/k/v, the q/k norms' and RoPE's outputs, the
  attention output with a memory-efficient kernel, the LoRA down-projections), the MoE block
  (norm input and output, float32 router probabilities, and per active expert the gathered
  input, gate_up output, hidden units, output and LoRA down-projections), the shared expert;
  with gradient checkpointing per layer, only each layer's input plus one layer's
  activations (recomputed during backward). The LM head's logits in the load dtype and the
  loss's float32 copy come on top (``V x 6`` bytes per token; large for small models).
- **overhead**: a fixed reserve for the CUDA context, allocator fragmentation and workspace.

These are estimates (the allocator's peak also depends on the order tensors are freed);
``max_tokens`` is the token budget per step (batch x length) that fits a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ubsmoe.backbones.native_convert import check_native_config, decoder_dims
from ubsmoe.backbones.random_checkpoint import architecture_config

GiB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part; ``per_token`` scales with the number of tokens in a step."""

    params_total: int  # backbone parameters (exact)
    params_active: int  # parameters a token uses at K experts (router + K experts + the rest)
    trainable_adapters: int  # expert LoRA + attention LoRA + phi (fp32)
    trainable_router: int  # router weights (the backbone's, trained in its dtype)
    weights_bytes: float
    trainable_bytes: float  # adapters' value, gradient, AdamW moments; routers' gradient and moments
    per_token_bytes: float  # activations (+ logits) per token of a step
    overhead_bytes: float

    @property
    def static_bytes(self) -> float:
        return self.weights_bytes + self.trainable_bytes + self.overhead_bytes

    def total_bytes(self, tokens: int) -> float:
        return self.static_bytes + tokens * self.per_token_bytes

    def max_tokens(self, budget_bytes: float) -> int:
        """Tokens per step (batch x length) that fit in ``budget_bytes``."""
        return max(0, int((budget_bytes - self.static_bytes) // self.per_token_bytes))


def count_parameters(config) -> int:
    """Exact parameter count of the ``*ForCausalLM`` of ``config``, built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def estimate_memory(
    config,
    *,
    k: int | None = None,
    lora_rank: int = 8,
    attention_targets: int = 4,
    expert_lora: bool = True,
    dtype_bytes: int = 2,
    adapter_bytes: int = 4,
    gradient_checkpointing: bool = False,
    overhead_gib: float = 4.0,
) -> MemoryEstimate:
    """Memory of one client's training step on a converted model at ``k`` active experts (default: top-k).

    ``attention_targets`` of q/k/v/o carry LoRA (in that order); ``dtype_bytes`` is the load
    dtype (bf16 = 2), ``adapter_bytes`` the adapters' (fp32 = 4).
    """
    rule = check_native_config(config)
    k = rule.top_k if k is None else k
    dims = decoder_dims(config)
    h, d, e, r = dims.hidden, dims.expert_size, dims.num_experts, lora_rank
    q_w, kv_w = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    sparse, dense_layers = dims.sparse_layers, dims.num_layers - dims.sparse_layers

    total = count_parameters(config)
    expert_params = 3 * h * d
    active = total - sparse * (e - k) * expert_params

    attention_shapes = ((h, q_w), (h, kv_w), (h, kv_w), (q_w, h))[:attention_targets]
    attention_lora = dims.num_layers * sum(r * (i + o) for i, o in attention_shapes)
    experts_lora = sparse * e * (r * (h + 2 * d) + r * (d + h)) if expert_lora and r else 0
    adapters = attention_lora + experts_lora + sparse * e  # + phi
    router = sparse * e * h
    trainable = adapters * adapter_bytes * 4 + router * dtype_bytes * 3

    attention_act = 2 * h + 3 * q_w + 3 * kv_w + q_w + q_w + kv_w + attention_targets * r
    lora_act = (2 * r if expert_lora and r else 0)
    moe_act = 2 * h + k * (2 * h + 3 * d + lora_act) + (2 * 4 // dtype_bytes) * e
    shared_act = 4 * dims.shared_expert_size + (1 if dims.shared_expert_gate else 0)
    dense_act = 2 * h + 4 * dims.dense_intermediate
    layer_act = attention_act + moe_act + shared_act  # in elements of the load dtype
    if gradient_checkpointing:
        per_layer_elements = dims.num_layers * h + layer_act
    else:
        per_layer_elements = sparse * layer_act + dense_layers * (attention_act + dense_act)
    logits = dims.vocab * (dtype_bytes + 4)
    per_token = per_layer_elements * dtype_bytes + logits
    return MemoryEstimate(
        params_total=total,
        params_active=active,
        trainable_adapters=adapters,
        trainable_router=router,
        weights_bytes=float(total * dtype_bytes),
        trainable_bytes=float(trainable),
        per_token_bytes=float(per_token),
        overhead_bytes=overhead_gib * GiB,
    )


def olmoe_1b_7b_config():
    """allenai/OLMoE-1B-7B-0125's shapes (its released config values), for an estimate without the hub."""
    return architecture_config("olmoe-1b-7b")


def report(config=None, budget_gib: float = 80.0, **options) -> str:
    """A small text table for the notes: parts in GiB and the tokens per step that fit ``budget_gib``."""
    config = config or olmoe_1b_7b_config()
    lines = []
    for ckpt in (False, True):
        est = estimate_memory(config, gradient_checkpointing=ckpt, **options)
        lines.append(
            f"checkpointing={ckpt}: params {est.params_total / 1e9:.2f}B (active {est.params_active / 1e9:.2f}B), "
            f"weights {est.weights_bytes / GiB:.1f} GiB, adapters {est.trainable_adapters / 1e6:.1f}M + routers "
            f"{est.trainable_router / 1e6:.1f}M -> trainable state {est.trainable_bytes / GiB:.2f} GiB, "
            f"overhead {est.overhead_bytes / GiB:.1f} GiB, activations+logits {est.per_token_bytes / 1024:.0f} KiB/token, "
            f"fits {est.max_tokens(budget_gib * GiB)} tokens/step in {budget_gib:.0f} GiB"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
