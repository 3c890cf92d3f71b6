"""MoEfication of Hugging Face encoders: clustering, router init, exact equivalence at K = M."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModel, BertConfig, GPT2Config, RobertaConfig, RobertaModel

from ubsmoe.errors import ConfigError
from ubsmoe.model import resolve_backbone_path
from ubsmoe.smoe.clustering import balanced_assignment, balanced_kmeans
from ubsmoe.smoe.layer import MoEOptions, SparseMoE
from ubsmoe.smoe.moefy import check_backbone_config, moefy


@pytest.fixture(scope="module")
def minilm():
    path = resolve_backbone_path("minilm")
    model = AutoModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="sdpa").eval()
    return model


@pytest.fixture(scope="module")
def minilm_moe(minilm):
    model = copy.deepcopy(minilm)
    blocks = moefy(model, num_experts=8, options=MoEOptions(), generator=torch.Generator().manual_seed(0))
    return model, blocks


def batch(length: int = 12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, length - 4 :] = 0
    return ids, mask


def hidden(model, blocks, ids, mask):
    for block in blocks.values():
        block.token_mask = mask.bool()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def float64_copies(original, moe):
    """float64 copies of a backbone and its MoEfied twin, with the twin's blocks.

    K = M sums each FFN's neurons expert by expert, a different order from the dense matmul;
    in float32 that alone moves outputs by BLAS-dependent amounts. In float64 the two must
    agree to ~1e-12 of the outputs' scale whatever the CPU.
    """
    original, moe = copy.deepcopy(original).double(), copy.deepcopy(moe).double()
    return original, moe, {n: m for n, m in moe.named_modules() if isinstance(m, SparseMoE)}


def assert_same_function(ours: torch.Tensor, reference: torch.Tensor) -> None:
    scale = float(reference.abs().max())
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-10 * scale)


def test_k_equal_m_reproduces_minilm(minilm, minilm_moe):
    original, model, blocks = float64_copies(minilm, minilm_moe[0])
    ids, mask = batch()
    for block in blocks.values():
        block.set_k(8)
    with torch.no_grad():
        reference = original(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_same_function(hidden(model, blocks, ids, mask), reference)


def test_structure_and_balanced_clusters(minilm, minilm_moe):
    model, blocks = minilm_moe
    assert len(blocks) == 6 and all(isinstance(b, SparseMoE) for b in blocks.values())
    layer = model.encoder.layer[0]
    assert layer.intermediate is blocks["encoder.layer.0"]
    assert isinstance(layer.output.dense, torch.nn.Identity)
    block = blocks["encoder.layer.0"]
    assert block.w1.shape == (8, 192, 384) and block.w2t.shape == (8, 192, 384)
    # every original neuron (row of W1 with its column of W2) is in exactly one expert
    original = minilm.encoder.layer[0].intermediate.dense.weight
    ours = block.w1.reshape(-1, 384)
    match = torch.cdist(ours, original).argmin(1)
    assert torch.equal(match.sort().values, torch.arange(1536))
    # centroid router: unit-norm rows
    torch.testing.assert_close(block.router.weight.norm(dim=1), torch.ones(8))


def test_lower_k_runs_fewer_experts_and_changes_output(minilm_moe):
    model, blocks = minilm_moe
    ids, mask = batch()
    full = hidden(model, blocks, ids, mask)
    for block in blocks.values():
        block.reset_telemetry()
        block.set_k(2)
    try:
        sparse = hidden(model, blocks, ids, mask)
    finally:
        for block in blocks.values():
            block.set_k(8)
    n_valid = int(mask.sum())
    for block in blocks.values():
        c = block.counters()
        assert c["tokens"] == n_valid and c["expert_tokens"].sum() == 2 * n_valid
        assert 2 / 8 <= c["max_load_fraction"] <= 1.0
    valid = mask.bool()
    cos = torch.nn.functional.cosine_similarity(full[valid], sparse[valid], dim=-1)
    assert 0.0 < cos.mean() < 0.999


def test_clustering_is_seeded_and_router_zero_init(minilm):
    a = copy.deepcopy(minilm.encoder.layer[0])
    b = copy.deepcopy(minilm.encoder.layer[0])
    wrap_a, wrap_b = torch.nn.Module(), torch.nn.Module()
    wrap_a.encoder, wrap_b.encoder = torch.nn.Module(), torch.nn.Module()
    wrap_a.encoder.layer, wrap_b.encoder.layer = torch.nn.ModuleList([a]), torch.nn.ModuleList([b])
    blocks_a = moefy(wrap_a, num_experts=4, router_init="zeros", generator=torch.Generator().manual_seed(5))
    blocks_b = moefy(wrap_b, num_experts=4, router_init="zeros", generator=torch.Generator().manual_seed(5))
    block_a, block_b = blocks_a["encoder.layer.0"], blocks_b["encoder.layer.0"]
    assert torch.equal(block_a.w1, block_b.w1)
    assert torch.count_nonzero(block_a.router.weight) == 0
    with pytest.raises(ConfigError) as err:
        moefy(copy.deepcopy(wrap_a), num_experts=4, router_init="random")
    assert err.value.key == "model.router_init"


def test_balanced_assignment_and_kmeans():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = (centers[:, None, :] + 0.1 * torch.randn(4, 25, 2, generator=g)).reshape(100, 2)
    labels = balanced_kmeans(points, 4, g)
    assert torch.bincount(labels).tolist() == [25, 25, 25, 25]
    # recovered the true groups (up to renaming)
    truth = torch.arange(4).repeat_interleave(25)
    for c in range(4):
        assert labels[truth == c].unique().numel() == 1
    # an oversubscribed cluster keeps only its nearest points
    dist = torch.tensor([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    assert balanced_assignment(dist).tolist() == [0, 0, 1, 1]


def test_roberta_from_config_k_equal_m():
    config = RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    check_backbone_config(config, 4, "roberta-tiny")
    torch.manual_seed(0)
    original = RobertaModel(config, add_pooling_layer=False).eval()
    model = copy.deepcopy(original)
    blocks = moefy(model, num_experts=4, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    original64, model64, blocks64 = float64_copies(original, model)
    with torch.no_grad():
        reference = original64(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_same_function(hidden(model64, blocks64, ids, mask), reference)
    with torch.no_grad():
        reference = original(input_ids=ids, attention_mask=mask).last_hidden_state
    for block in blocks.values():
        block.set_k(1)
    assert not torch.allclose(hidden(model, blocks, ids, mask), reference, atol=1e-3)


def test_config_errors():
    with pytest.raises(ConfigError) as err:
        check_backbone_config(GPT2Config(), 8, "gpt2")
    assert err.value.key == "model.backbone"
    with pytest.raises(ConfigError) as err:
        check_backbone_config(BertConfig(intermediate_size=1536), 7, "minilm")
    assert err.value.key == "model.num_experts"
    with pytest.raises(ConfigError):
        check_backbone_config(BertConfig(intermediate_size=1536), 0, "minilm")
