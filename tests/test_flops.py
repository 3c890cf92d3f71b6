"""Analytic FLOPs per example against FlopCounterMode (eager attention), and the K = M/4 budget."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torchmetrics

from ubsmoe.model import FederatedClassifier
from ubsmoe.settings import MethodSettings, ModelSettings
from ubsmoe.smoe.flops import EncoderDims, flops_per_example


def build(sparse: bool) -> FederatedClassifier:
    return FederatedClassifier(
        model=ModelSettings(), method=MethodSettings(sparse=sparse), num_labels=3,
        metrics=torchmetrics.MetricCollection({}), num_tiers=1, init_seed=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def models():
    return build(True), build(False)


def unpadded_batch(length: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (2, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("length", [16, 40])
def test_analytic_matches_measured(models, length):
    sparse, dense = models
    batch = unpadded_batch(length)
    for k in (1, 2, 4, 8):
        sparse.set_client(k=k)
        measured = sparse.measured_flops_per_example(batch)
        assert measured == pytest.approx(sparse.flops_per_example(length), rel=0.05)
    sparse.set_client()
    measured = dense.measured_flops_per_example(batch)
    assert measured == pytest.approx(dense.flops_per_example(length), rel=0.05)
    dense.set_client(rank=3)
    assert dense.measured_flops_per_example(batch) > dense.flops_per_example(length)  # computed at full rank
    dense.set_client()
    # measuring switched attention to eager and back
    assert sparse.backbone.config._attn_implementation == "sdpa"


def test_flops_shrink_with_k(models):
    sparse, _ = models
    counts = []
    for k in (1, 2, 4, 8):
        sparse.set_client(k=k)
        counts.append(sparse.flops_per_example(64))
    sparse.set_client()
    assert counts == sorted(counts) and counts[0] < counts[-1]


@pytest.mark.parametrize("length", [64, 128])
def test_quarter_of_experts_costs_at_most_055_of_dense(length):
    minilm = EncoderDims(num_layers=6, hidden=384, intermediate=1536, num_labels=2, attention_lora=((384, 384),) * 2)
    dense = flops_per_example(minilm, length, lora_rank=8, sparse=False)
    quarter = flops_per_example(minilm, length, lora_rank=8, sparse=True, num_experts=8, k=2)
    full = flops_per_example(minilm, length, lora_rank=8, sparse=True, num_experts=8, k=8)
    assert quarter / dense <= 0.55
    assert 1.0 < full / dense < 1.05  # per-expert LoRA and the router cost a little more than dense LoRA
