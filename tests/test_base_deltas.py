"""FLoRA's merged updates: the model sets frozen weights to W0 + delta, absolutely, and restores W0."""

from __future__ import annotations

import pytest
import torch
from helpers import build, make_batch


@pytest.fixture(scope="module")
def dense():
    model = build(sparse=False)
    model.eval()
    return model


def test_base_delta_is_absolute_and_restorable(dense) -> None:
    batch = make_batch()
    names = [n for n in dense.trainable_state() if n.endswith("lora_A.default.weight")]
    prefix = names[0].removesuffix(".lora_A.default.weight")
    weight = dict(dense.named_modules())[prefix].get_base_layer().weight
    original = weight.detach().clone()
    before = dense._logits(batch)
    delta = torch.full_like(weight, 0.01)
    name = f"{prefix}.base_delta"
    dense.set_base_deltas({name: delta})
    torch.testing.assert_close(weight, original + delta)
    changed = dense._logits(batch)
    assert not torch.allclose(changed, before)
    dense.set_base_deltas({name: delta})  # the same delta again: not added twice
    torch.testing.assert_close(weight, original + delta)
    dense.set_base_deltas({})  # no delta: W0 back, outputs back
    torch.testing.assert_close(weight, original)
    torch.testing.assert_close(dense._logits(batch), before)


def test_base_delta_names_must_exist(dense) -> None:
    with pytest.raises(KeyError, match="names no LoRA-adapted module"):
        dense.set_base_deltas({"backbone.nothing.base_delta": torch.zeros(1)})
