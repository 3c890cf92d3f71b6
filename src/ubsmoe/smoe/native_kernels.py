"""The expert kernel of :class:`ubsmoe.smoe.native_layer.NativeSparseMoE`: sorted dispatch of SwiGLU experts.

:class:`SwiGLUExperts` is a ``torch.autograd.Function`` with a hand-written backward over the
``(token, expert)`` assignments sorted by expert (:class:`SortedAssignments`), so its cost
scales with ``K_c``; its per-expert matrix products are those of :class:`SegmentProducts` (a
loop of ``mm`` per expert) or :class:`GroupedProducts` (``torch.nn.functional.grouped_mm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SortedAssignments:
    """The (token, expert) assignments of the dispatched tokens, sorted by expert."""

    tokens: torch.Tensor  # [A] token of each assignment
    gates: torch.Tensor  # [A] gate of each assignment
    counts: torch.Tensor  # [E] assignments per expert

    def segments(self) -> list[tuple[int, int, int]]:
        """(expert, first row, number of rows) for each expert that received rows (computed once)."""
        cached = getattr(self, "_segments", None)
        if cached is None:
            cached, start = [], 0
            for expert, count in enumerate(self.counts.tolist()):
                if count:
                    cached.append((expert, start, count))
                start += count
            self._segments = cached
        return cached


class SegmentProducts:
    """Per-expert products over a plan's expert-contiguous rows: one ``mm`` per expert with rows.

    ``rows_t(a, w)``: row ``i`` of ``a`` times ``w[e_i]^T`` (``w`` stored ``[E, n, k]``, as
    nn.Linear weights); ``rows(a, w)``: times ``w[e_i]``; ``add_rows_t`` / ``add_rows``: the
    same accumulated into an output in place; ``outer(a, b)``: ``[E, m, n]`` with
    ``a[rows of e]^T b[rows of e]`` (zero for an expert without rows); ``sums(a)``: ``[E, m]``.
    """

    def __init__(self, plan: SortedAssignments) -> None:
        self.plan = plan
        self.segments = plan.segments()

    def rows_t(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = a.new_empty(a.shape[0], w.shape[1])
        for e, start, count in self.segments:
            torch.mm(a[start : start + count], w[e].t(), out=out[start : start + count])
        return out

    def rows(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = a.new_empty(a.shape[0], w.shape[2])
        for e, start, count in self.segments:
            torch.mm(a[start : start + count], w[e], out=out[start : start + count])
        return out

    def add_rows_t(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
        """``out += alpha * rows_t(a, w)`` in place (fused into the products: no extra pass over ``out``)."""
        for e, start, count in self.segments:
            out[start : start + count].addmm_(a[start : start + count], w[e].t(), alpha=alpha)
        return out

    def add_rows(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
        """``out += alpha * rows(a, w)`` in place."""
        for e, start, count in self.segments:
            out[start : start + count].addmm_(a[start : start + count], w[e], alpha=alpha)
        return out

    def outer(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a.new_zeros(self.plan.counts.shape[0], a.shape[1], b.shape[1])
        for e, start, count in self.segments:
            torch.mm(a[start : start + count].t(), b[start : start + count], out=out[e])
        return out

    def sums(self, a: torch.Tensor) -> torch.Tensor:
        out = a.new_zeros(self.plan.counts.shape[0], a.shape[1])
        for e, start, count in self.segments:
            torch.sum(a[start : start + count], dim=0, out=out[e])
        return out


class GroupedProducts(SegmentProducts):
    """The same products with ``torch.nn.functional.grouped_mm``: one kernel for all experts, no host sync.

    Meant for GPUs (a handful of launches instead of a dozen per expert; opt in with
    ``block.grouped_mm = True``); on this CPU it measured no faster than the loop. It needs
    float32/bf16/fp16 with 16-byte-aligned rows (:func:`grouped_mm_supported`).
    """

    def __init__(self, plan: SortedAssignments) -> None:
        self.plan = plan
        self.offsets = torch.cumsum(plan.counts, 0, dtype=torch.int32)

    def rows_t(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.grouped_mm(a, w.transpose(1, 2), offs=self.offsets)

    def rows(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.grouped_mm(a, w, offs=self.offsets)

    def add_rows_t(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
        return out.add_(self.rows_t(a, w), alpha=alpha)

    def add_rows(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
        return out.add_(self.rows(a, w), alpha=alpha)

    def outer(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = F.grouped_mm(a.t(), b, offs=self.offsets)
        return out.masked_fill((self.plan.counts == 0)[:, None, None], 0.0)  # empty groups: zero, whatever the kernel

    def sums(self, a: torch.Tensor) -> torch.Tensor:
        experts = torch.repeat_interleave(torch.arange(self.plan.counts.shape[0], device=a.device), self.plan.counts)
        return a.new_zeros(self.plan.counts.shape[0], a.shape[1]).index_add_(0, experts, a)


def grouped_mm_supported(*tensors: torch.Tensor) -> bool:
    """Whether :class:`GroupedProducts` can run on these tensors (dtype and 16-byte row alignment)."""
    if not hasattr(F, "grouped_mm"):
        return False
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or (t.shape[-1] * t.element_size()) % 16:
            return False
    return True


class SwiGLUExperts(torch.autograd.Function):
    """Sorted dispatch of SwiGLU experts with a hand-written backward (the frozen stacks never enter autograd).

    Inputs: ``x [N, h]``; ``gates [A]`` (one per sorted assignment); the four LoRA stacks (or
    ``None``); the :class:`SortedAssignments`; the frozen ``gate_up [E, 2d, h]`` and
    ``down [E, h, d]``; the LoRA scaling; the activation; whether to return the per-expert sums
    of the hidden units; the products class (:class:`SegmentProducts` or
    :class:`GroupedProducts`). Returns ``y [N, h] = sum_a g_a E_{e_a}(x_{t_a})`` and the sums
    ``[E, d]`` (no gradient). Gradients: ``x``, ``gates`` (``<dL/dy, E_e(x)>``) and the LoRA
    stacks, the same as :meth:`ubsmoe.smoe.native_layer.NativeSparseMoE.run_experts_autograd`
    computes in autograd.
    """

    @staticmethod
    def forward(ctx, x, gates, a1, b1, a2, b2, plan, gate_up, down, scaling, act, want_sums, products_cls):
        d = down.shape[2]
        has_lora = a1 is not None
        products = products_cls(plan)
        xs = x.index_select(0, plan.tokens)
        gu = products.rows_t(xs, gate_up)  # [A, 2d]
        xa = ha = None
        if has_lora:
            xa = products.rows_t(xs, a1)  # [A, r]
            products.add_rows_t(gu, xa, b1, scaling)
        g, u = gu[:, :d], gu[:, d:]
        hidden = act.forward(g) * u
        out = products.rows_t(hidden, down)  # [A, h]
        if has_lora:
            ha = products.rows_t(hidden, a2)
            products.add_rows_t(out, ha, b2, scaling)
        y = x.new_zeros(x.shape).index_add_(0, plan.tokens, out * gates[:, None])
        sums = products.sums(hidden) if want_sums else x.new_zeros(down.shape[0], d)
        ctx.save_for_backward(xs, gu, hidden, out, xa, ha, gates, a1, b1, a2, b2, gate_up, down)
        ctx.products = products
        ctx.meta = (scaling, act, has_lora, x.shape[0])
        ctx.mark_non_differentiable(sums)
        return y, sums

    @staticmethod
    def backward(ctx, dy, _dsums):
        xs, gu, hidden, out, xa, ha, gates, a1, b1, a2, b2, gate_up, down = ctx.saved_tensors
        products = ctx.products
        plan = products.plan
        scaling, act, has_lora, num_tokens = ctx.meta
        d = down.shape[2]
        dys = dy.index_select(0, plan.tokens)
        dgates = (dys * out).sum(1) if ctx.needs_input_grad[1] else None
        dout = dys * gates[:, None]
        dhidden = products.rows(dout, down)  # [A, d]
        da1 = db1 = da2 = db2 = None
        if has_lora:
            t2 = products.rows(dout, b2)  # [A, r]
            products.add_rows(dhidden, t2, a2, scaling)
            da2 = products.outer(t2, hidden).mul_(scaling)
            # B's gradient as [E, r, out] then flipped: products with r output rows are faster
            db2 = products.outer(ha, dout).transpose(1, 2).mul(scaling).contiguous()
        g, u = gu[:, :d], gu[:, d:]
        dgu = torch.cat([act.backward(dhidden * u, g), dhidden * act.forward(g)], dim=1)
        dxs = products.rows(dgu, gate_up)  # [A, h]
        if has_lora:
            t1 = products.rows(dgu, b1)  # [A, r]
            products.add_rows(dxs, t1, a1, scaling)
            da1 = products.outer(t1, xs).mul_(scaling)
            db1 = products.outer(xa, dgu).transpose(1, 2).mul(scaling).contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dxs.new_zeros(num_tokens, dxs.shape[1]).index_add_(0, plan.tokens, dxs)
        return (dx, dgates, da1, db1, da2, db2) + (None,) * 7

