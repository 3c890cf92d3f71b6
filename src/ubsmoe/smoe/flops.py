"""Forward FLOPs per example: an analytic count per tier, and a measured one that checks it.

Convention: one multiply-add is 2 FLOPs; only matrix products are counted (what
``torch.utils.flop_counter.FlopCounterMode`` counts), so embeddings lookups, LayerNorm,
activations, softmax and pooling are left out of both counts. Attention is counted as the
eager kernel computes it (``Q K^T`` and ``P V``): ``FlopCounterMode`` does not count the
CPU scaled-dot-product kernel, so measurements must run the backbone with eager attention.
The PG router signal is a training-only term whose value is zero; it is not counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def token_lengths(loaders: Mapping[str, Iterable[Mapping[str, Any]]]) -> Counter[int]:
    """Token counts (attention mask sums) of every example the evaluation loaders serve."""
    lengths: Counter[int] = Counter()
    for loader in loaders.values():
        for batch in loader:
            lengths.update(int(n) for n in batch["attention_mask"].sum(1).tolist())
    return lengths


def mean_over_lengths(lengths: Counter[int], flops_at_length: Callable[[int], float]) -> float:
    """Mean of ``flops_at_length(L)`` over examples with token counts ``lengths``: per-example FLOPs of a set."""
    total = sum(count * flops_at_length(length) for length, count in lengths.items())
    return total / max(sum(lengths.values()), 1)


@dataclass(frozen=True)
class EncoderDims:
    """The shapes of a BERT-family encoder that its FLOPs depend on."""

    num_layers: int
    hidden: int
    intermediate: int
    num_labels: int
    # (in, out) features of each attention Linear that carries LoRA, in one layer
    attention_lora: tuple[tuple[int, int], ...] = ()


def lora_flops(in_features: int, out_features: int, rank: int) -> float:
    """Per token: ``x A^T`` then ``(x A^T) B^T``."""
    return 2.0 * rank * (in_features + out_features)


def attention_flops(dims: EncoderDims, seq_len: int, lora_rank: int) -> float:
    """Per token and layer: Q, K, V and output projections, the two attention products, LoRA."""
    projections = 4 * 2.0 * dims.hidden * dims.hidden
    scores_and_context = 2 * 2.0 * seq_len * dims.hidden
    adapters = sum(lora_flops(i, o, lora_rank) for i, o in dims.attention_lora) if lora_rank else 0.0
    return projections + scores_and_context + adapters


def dense_ffn_flops(dims: EncoderDims, lora_rank: int, ffn_lora: bool) -> float:
    """Per token and layer, the dense FFN (two matrices) with optional LoRA on both."""
    h, d = dims.hidden, dims.intermediate
    base = 2 * 2.0 * h * d
    adapters = lora_flops(h, d, lora_rank) + lora_flops(d, h, lora_rank) if ffn_lora and lora_rank else 0.0
    return base + adapters


def sparse_ffn_flops(dims: EncoderDims, num_experts: int, k: int, lora_rank: int) -> float:
    """Per token and layer: the router and ``k`` experts of width ``d / M``, each with LoRA."""
    h, de = dims.hidden, dims.intermediate // num_experts
    router = 2.0 * h * num_experts
    expert = 2 * 2.0 * h * de
    adapters = lora_flops(h, de, lora_rank) + lora_flops(de, h, lora_rank) if lora_rank else 0.0
    return router + k * (expert + adapters)


def flops_per_example(
    dims: EncoderDims,
    seq_len: int,
    *,
    lora_rank: int,
    sparse: bool,
    num_experts: int = 1,
    k: int = 1,
    ffn_lora: bool = True,
) -> float:
    """Analytic forward FLOPs of one example of ``seq_len`` tokens (no padding), head included."""
    if sparse:
        ffn = sparse_ffn_flops(dims, num_experts, k, lora_rank if ffn_lora else 0)
    else:
        ffn = dense_ffn_flops(dims, lora_rank, ffn_lora)
    per_token = dims.num_layers * (attention_flops(dims, seq_len, lora_rank) + ffn)
    head = 2.0 * dims.hidden * dims.num_labels
    return seq_len * per_token + head


def _inplace_addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """``C.addmm_(A, B)``: the same product as ``addmm``, which is all the counter registers."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def measure_flops(fn: Callable[[], object]) -> int:
    """Matrix-product FLOPs that ``fn()`` performs, counted by ``FlopCounterMode``.

    The kernels accumulate LoRA products in place (``addmm_``), an overload the counter's
    registry lacks, so it is added here with the ``addmm`` formula.
    """
    mapping = {torch.ops.aten.addmm_: _inplace_addmm_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------- native sparse decoders
@dataclass(frozen=True)
class DecoderDims:
    """The shapes of a natively sparse decoder (OLMoE, Qwen-MoE, Mixtral) that its FLOPs depend on."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    num_experts: int
    expert_size: int  # d: each expert is SwiGLU h -> 2d (gate, up) -> d -> h
    sparse_layers: int  # layers whose MLP is a sparse block; the others run a dense SwiGLU MLP
    dense_intermediate: int = 0  # width of those dense MLPs
    shared_expert_size: int = 0  # Qwen2-MoE's always-on expert (0 = none)
    shared_expert_gate: bool = False  # its sigmoid gate, a Linear h -> 1
    # (in, out) features of each attention Linear that carries LoRA, in one layer
    attention_lora: tuple[tuple[int, int], ...] = ()


def decoder_attention_flops(dims: DecoderDims, seq_len: int, lora_rank: int) -> float:
    """Per token and layer: Q, K, V, O projections (grouped K/V), ``Q K^T`` and ``P V``, LoRA.

    The eager kernel multiplies the full ``L x L`` score matrix (the causal mask is applied to
    it, not skipped), so the two products cost ``seq_len`` per query head whatever the position.
    """
    q_width, kv_width = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim
    projections = 2.0 * dims.hidden * (2 * q_width + 2 * kv_width)
    scores_and_context = 2 * 2.0 * seq_len * q_width
    adapters = sum(lora_flops(i, o, lora_rank) for i, o in dims.attention_lora) if lora_rank else 0.0
    return projections + scores_and_context + adapters


def swiglu_flops(hidden: int, width: int) -> float:
    """Per token: ``h -> 2 width`` (gate and up) then ``width -> h``."""
    return 2.0 * hidden * 2 * width + 2.0 * width * hidden


def native_moe_flops(dims: DecoderDims, k: int, lora_rank: int) -> float:
    """Per token and sparse layer: the router, ``k`` SwiGLU experts with LoRA on gate_up and down, the shared expert."""
    h, d = dims.hidden, dims.expert_size
    router = 2.0 * h * dims.num_experts
    adapters = lora_flops(h, 2 * d, lora_rank) + lora_flops(d, h, lora_rank) if lora_rank else 0.0
    shared = swiglu_flops(h, dims.shared_expert_size) if dims.shared_expert_size else 0.0
    shared_gate = 2.0 * h if dims.shared_expert_gate else 0.0
    return router + k * (swiglu_flops(h, d) + adapters) + shared + shared_gate


def decoder_flops_per_token(
    dims: DecoderDims, seq_len: int, *, k: int, lora_rank: int, expert_lora: bool = True, lm_head: bool = True
) -> float:
    """Analytic forward FLOPs per token of a ``seq_len``-token sequence (no padding) at ``k`` experts.

    ``lora_rank`` applies to the attention LoRA and (with ``expert_lora``) to the experts'.
    The LM head (``h -> vocab`` on every position, as a training forward computes it) is included
    with ``lm_head``.
    """
    attention = decoder_attention_flops(dims, seq_len, lora_rank)
    moe = native_moe_flops(dims, k, lora_rank if expert_lora else 0)
    dense = swiglu_flops(dims.hidden, dims.dense_intermediate)
    total = dims.num_layers * attention + dims.sparse_layers * moe + (dims.num_layers - dims.sparse_layers) * dense
    return total + (2.0 * dims.hidden * dims.vocab if lm_head else 0.0)
