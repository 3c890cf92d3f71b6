"""The native block's grouped expert products on a GPU (skipped without CUDA).

- the default kernel on CUDA (``expert_kernel: auto``) is the grouped one, and it gives the
  loop's values, gradients, D_i and missed-token sums, in float32 and bf16, with padding;
- a training forward and backward of a block (DMR, PG router and expert signals, balance
  loss, padding) makes no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

import pytest
import torch

from ubsmoe.backbones.native_convert import convert
from ubsmoe.backbones.tiny import tiny_model
from ubsmoe.smoe.native_kernels import GroupedProducts, products_class

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HIDDEN = 64


def cuda_block(dtype: torch.dtype, kernel: str, **convert_args):
    model = tiny_model("olmoe", seed=1, num_experts_per_tok=4)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0, generator=g)
    # rank 8: 16-byte LoRA rows in bf16, which grouped_mm needs
    convert(model, lora_rank=8, expert_kernel=kernel, generator=torch.Generator().manual_seed(0), **convert_args)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        for t in block.lora.tensors():
            t.normal_(0.0, 0.3, generator=g)
    block.experts.to(dtype)
    return block.cuda().train()


def batch(dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, HIDDEN, generator=g).to("cuda", dtype)
    mask = torch.ones(4, 16, dtype=torch.bool)
    mask[1, 10:] = False
    mask[3, 5:] = False
    return x, mask.cuda(), torch.randn(4, 16, HIDDEN, generator=g).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_grouped_on_cuda_equals_the_loop(dtype, k):
    results = []
    for kernel in ("loop", "auto"):
        block = cuda_block(dtype, kernel)
        block.set_k(k)
        x, mask, dy = batch(dtype)
        x.requires_grad_(True)
        block.token_mask = mask
        (block(x) * dy).sum().backward()
        if kernel == "auto":
            tensors = (x, block.experts.gate_up_proj, block.experts.down_proj, *block.lora.tensors())
            assert products_class("auto", *(t.to(dtype) for t in tensors)) is GroupedProducts
        sink = block.pg_sink
        results.append([x.grad.float(), block.router.weight.grad, block.phi.grad,
                        *(t.grad for t in block.lora.tensors()), block.pg_default.clone(), *sink.sums])  # fmt: skip
    rtol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(*results, strict=True):
        assert bool(torch.isfinite(b).all())
        torch.testing.assert_close(b.float(), a.float(), rtol=rtol, atol=rtol * float(a.abs().max()))


def test_a_training_block_never_synchronises_with_the_host():
    block = cuda_block(torch.bfloat16, "auto", balance_loss=True, num_candidates=3)
    block.set_k(2)
    x, mask, dy = batch(torch.bfloat16)
    x.requires_grad_(True)
    block.token_mask = mask
    for _ in range(2):  # the second step also updates D_i and the counters from a warm state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = block(x)
            ((y * dy).sum() + block.aux_loss).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    assert block.pg_sink is not None and bool(torch.isfinite(block.lora.lora_B1.grad).all())
