"""How close a MoEfied encoder stays to its dense original, before any fine-tuning.

Two numbers per K, on a batch of sentences: the cosine between the MoEfied and the dense
hidden states after every layer (averaged over non-padding tokens), and the cosine between
the mean-pooled final embeddings (averaged over sentences), which is what a mean-pooling
head reads. Either with the blocks' own routers or with the oracle router
(:func:`ubsmoe.smoe.coactivation.oracle_routing`), the ceiling of any router for the same
experts. Used by ``benchmarks/moefy_quality.py`` and the tests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.smoe.coactivation import oracle_routing
from ubsmoe.smoe.layer import SparseMoE


@dataclass
class Closeness:
    embedding_cosine: float
    layer_cosine: list[float]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@torch.no_grad()
def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The hidden state after every layer (embeddings excluded), eval mode."""
    was_training = model.training
    model.eval()
    try:
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return model(**kwargs, output_hidden_states=True).hidden_states[1:]
    finally:
        model.train(was_training)


def closeness(
    reference: tuple[torch.Tensor, ...], states: tuple[torch.Tensor, ...], mask: torch.Tensor
) -> Closeness:
    """Per-layer token cosine and pooled-embedding cosine of ``states`` to ``reference``."""
    valid = mask.bool()
    layers = [float(F.cosine_similarity(s[valid].double(), r[valid].double(), dim=-1).mean())
              for s, r in zip(states, reference, strict=True)]  # fmt: skip
    pooled = F.cosine_similarity(_mean_pool(states[-1].double(), mask), _mean_pool(reference[-1].double(), mask), dim=-1)
    return Closeness(embedding_cosine=float(pooled.mean()), layer_cosine=layers)


@torch.no_grad()
def moefied_closeness(
    model: nn.Module,
    blocks: dict[str, SparseMoE],
    batch: dict[str, torch.Tensor],
    reference: tuple[torch.Tensor, ...],
    k: int,
    *,
    oracle: bool = False,
) -> Closeness:
    """Closeness of ``model`` (MoEfied, ``blocks``) at ``k`` experts to the dense ``reference`` states."""
    mask = batch["attention_mask"].bool()
    previous = {name: block.k for name, block in blocks.items()}
    for block in blocks.values():
        block.set_k(k)
        block.token_mask = mask
    context = oracle_routing(blocks.values()) if oracle else contextlib.nullcontext()
    try:
        with context:
            states = hidden_states(model, batch)
    finally:
        for name, block in blocks.items():
            block.set_k(previous[name])
            block.token_mask = None
    return closeness(reference, states, mask)
