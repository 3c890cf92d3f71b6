"""The expert kernel of :class:`ubsmoe.smoe.native_layer.NativeSparseMoE`: sorted dispatch of SwiGLU experts.

:class:`SwiGLUExperts` is a ``torch.autograd.Function`` with a hand-written backward over the
``(token, expert)`` assignments sorted by expert (:class:`SortedAssignments`), so its cost
scales with ``K_c``. Its per-expert matrix products come from one of two classes with the
same methods:

- :class:`GroupedProducts`: ``torch.nn.functional.grouped_mm`` over the expert segments, one
  kernel per product for all experts, with the segment ends kept on the device: no host
  synchronisation anywhere in the forward or backward pass. The default on CUDA
  (``model.expert_kernel: auto``), where a per-expert loop pays a launch per expert and a
  device-to-host copy of the counts.
- :class:`SegmentProducts`: a Python loop of ``mm`` per expert that received rows; the
  reference, and the default on CPU, where it measured at least as fast as ``grouped_mm``.

The expert LoRA runs as products of the same kind over the same segments, and with
``method.pg.expert_mode: missed_tokens`` the backward pass adds the missed-token sums of the
PG expert signal (:func:`ubsmoe.smoe.pseudo_grad.accumulate_missed_tokens`) from the
quantities it already has.

Padding. The assignments of padding tokens are sorted behind every expert's (expert index
``E``, a bucket no product reads), so the plan has a fixed size ``N K`` and no ``nonzero``;
the products leave those tail rows out and write zeros there, so nothing from them reaches
an output, a gradient or a sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ubsmoe.names import EXPERT_KERNELS
from ubsmoe.smoe.pseudo_grad import MissedTokenSink, accumulate_missed_tokens


@dataclass
class SortedAssignments:
    """The (token, expert) assignments of a batch, sorted by expert; padding's last (expert ``E``)."""

    tokens: torch.Tensor  # [A] token of each assignment
    gates: torch.Tensor  # [A] gate of each assignment
    experts: torch.Tensor  # [A] expert of each assignment (E: a padding token's, after all others)
    counts: torch.Tensor  # [E] real assignments per expert
    offsets: torch.Tensor  # [E] int32: end row of each expert's segment (cumulative counts)
    padded: bool  # whether the tail holds padding assignments (rows from offsets[-1] on)

    def segments(self) -> list[tuple[int, int, int]]:
        """(expert, first row, number of rows) for each expert that received rows (one host copy, cached)."""
        cached = getattr(self, "_segments", None)
        if cached is None:
            cached, start = [], 0
            for expert, count in enumerate(self.counts.tolist()):
                if count:
                    cached.append((expert, start, count))
                start += count
            self._segments = cached
        return cached


def sort_assignments(
    experts: torch.Tensor, gates: torch.Tensor, valid: torch.Tensor | None, num_experts: int
) -> SortedAssignments:
    """Sort the assignments ``experts``/``gates`` ``[N, K]`` by expert (stable: tokens ascending within an expert).

    ``valid`` ``[N]`` (or ``None``: every token real) sends padding tokens' assignments to the
    bucket ``E`` at the end. Device operations only (a sort and a binary search for the
    segment ends): no ``nonzero``, ``bincount`` or host copy, so a GPU never waits here.
    """
    n, k = experts.shape
    flat = experts.reshape(-1)
    if valid is not None:
        flat = flat.masked_fill(~valid.repeat_interleave(k), num_experts)
    experts_sorted, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts, device=flat.device, dtype=experts_sorted.dtype)
    offsets = torch.searchsorted(experts_sorted, bounds, right=True, out_int32=True)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).to(torch.long)
    return SortedAssignments(
        tokens=order // k, gates=gates.reshape(-1).index_select(0, order), experts=experts_sorted, counts=counts,
        offsets=offsets, padded=valid is not None,
    )  # fmt: skip


class SegmentProducts:
    """Per-expert products over a plan's expert-contiguous rows: one ``mm`` per expert with rows.

    ``rows_t(a, w)``: row ``i`` of ``a`` times ``w[e_i]^T`` (``w`` stored ``[E, n, k]``, as
    nn.Linear weights); ``rows(a, w)``: times ``w[e_i]``; ``add_rows_t`` / ``add_rows``: the
    same accumulated into an output in place; ``outer(a, b)``: ``[E, m, n]`` with
    ``a[rows of e]^T b[rows of e]`` (zero for an expert without rows); ``sums(a)``: ``[E, m]``.
    Rows of padding assignments (the plan's tail) come out zero.
    """

    def __init__(self, plan: SortedAssignments) -> None:
        self.plan = plan
        self.segments = plan.segments()
        self.num_experts = plan.counts.shape[0]
        self.end = self.segments[-1][1] + self.segments[-1][2] if self.segments else 0

    def _new(self, a: torch.Tensor, width: int) -> torch.Tensor:
        out = a.new_empty(a.shape[0], width)
        out[self.end :] = 0  # padding rows (none without padding)
        return out

    def rows_t(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = self._new(a, w.shape[1])
        for e, start, count in self.segments:
            torch.mm(a[start : start + count], w[e].t(), out=out[start : start + count])
        return out

    def rows(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = self._new(a, w.shape[2])
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
        out = a.new_zeros(self.num_experts, a.shape[1], b.shape[1])
        for e, start, count in self.segments:
            torch.mm(a[start : start + count].t(), b[start : start + count], out=out[e])
        return out

    def sums(self, a: torch.Tensor) -> torch.Tensor:
        out = a.new_zeros(self.num_experts, a.shape[1])
        for e, start, count in self.segments:
            torch.sum(a[start : start + count], dim=0, out=out[e])
        return out


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.grouped_mm`` (rows past the last offset are left unwritten by it)."""
    return F.grouped_mm(a, b, offs=offsets)


class GroupedProducts:
    """The products of :class:`SegmentProducts` with grouped matrix products: no host sync, no loop.

    Every product is one grouped product over the experts' segments (``offsets`` stay on the
    device); the padding tail, which the grouped product leaves unwritten, is zeroed with one
    ``masked_fill_`` (only when the batch has padding). Needs float32/bf16/fp16 with 16-byte
    aligned rows (:func:`grouped_mm_supported`). ``mm`` is the grouped product itself
    (:func:`grouped_mm`; tests put a float64 emulation with the same contract there).
    """

    def __init__(self, plan: SortedAssignments, mm=None) -> None:
        self.plan = plan
        self.mm = grouped_mm if mm is None else mm
        self.num_experts = plan.counts.shape[0]
        self.tail = (plan.experts >= self.num_experts)[:, None] if plan.padded else None
        self.empty = (plan.counts == 0)[:, None, None]

    def _rows(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = self.mm(a, w, self.plan.offsets)
        return out if self.tail is None else out.masked_fill_(self.tail, 0.0)

    def rows_t(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._rows(a, w.transpose(1, 2))

    def rows(self, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._rows(a, w)

    def add_rows_t(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
        return out.add_(self.rows_t(a, w), alpha=alpha)

    def add_rows(self, out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
        return out.add_(self.rows(a, w), alpha=alpha)

    def outer(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = self.mm(a.t(), b, self.plan.offsets)
        return out.masked_fill_(self.empty, 0.0)  # empty groups: zero, whatever the kernel

    def sums(self, a: torch.Tensor) -> torch.Tensor:
        # padding rows go to the extra bucket E (their rows are zero anyway)
        return a.new_zeros(self.num_experts + 1, a.shape[1]).index_add_(0, self.plan.experts, a)[: self.num_experts]


def grouped_mm_supported(*tensors: torch.Tensor) -> bool:
    """Whether :class:`GroupedProducts` can run on these tensors (dtype and 16-byte row alignment)."""
    if not hasattr(F, "grouped_mm"):
        return False
    for t in tensors:
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or (t.shape[-1] * t.element_size()) % 16:
            return False
    return True


def products_class(kernel: str, *tensors: torch.Tensor) -> type:
    """The products for ``model.expert_kernel``: ``auto`` = grouped on CUDA where supported, else the loop.

    ``grouped`` asks for the grouped products on any device (``grouped_mm`` runs on CPU too,
    for float32 and bf16) and falls back to the loop only where they cannot run (float64,
    misaligned rows); ``loop`` is the per-expert loop everywhere.
    """
    if kernel not in EXPERT_KERNELS:
        raise ValueError(f"expert kernel {kernel!r} is not one of {EXPERT_KERNELS}")
    if kernel == "loop" or not grouped_mm_supported(*tensors):
        return SegmentProducts
    if kernel == "auto" and not tensors[0].is_cuda:
        return SegmentProducts
    return GroupedProducts


@dataclass
class MissedTokenArgs:
    """What the backward pass needs for the PG expert signal: the sink and ``q [N, E]`` (p on missed, real tokens)."""

    sink: MissedTokenSink
    q: torch.Tensor


class SwiGLUExperts(torch.autograd.Function):
    """Sorted dispatch of SwiGLU experts with a hand-written backward (the frozen stacks never enter autograd).

    Inputs: ``x [N, h]``; ``gates [A]`` (one per sorted assignment); the four LoRA stacks (or
    ``None``); the :class:`SortedAssignments`; the frozen ``gate_up [E, 2d, h]`` and
    ``down [E, h, d]``; the LoRA scaling; the activation; whether to return the per-expert sums
    of the hidden units; the products (a :class:`SegmentProducts` or :class:`GroupedProducts`
    over the plan); the PG expert signal's :class:`MissedTokenArgs` or ``None``. Returns
    ``y [N, h] = sum_a g_a E_{e_a}(x_{t_a})`` and the sums ``[E, d]`` (no gradient).
    Gradients: ``x``, ``gates`` (``<dL/dy, E_e(x)>``) and the LoRA stacks, the same as
    :meth:`ubsmoe.smoe.native_layer.NativeSparseMoE.run_experts_autograd` computes in autograd.
    """

    @staticmethod
    def forward(ctx, x, gates, a1, b1, a2, b2, plan, gate_up, down, scaling, act, want_sums, products, missed):
        d = down.shape[2]
        has_lora = a1 is not None
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
        missed = missed if has_lora else None
        ctx.save_for_backward(xs, gu, hidden, out, xa, ha, gates, a1, b1, a2, b2, gate_up, down,
                              x if missed is not None else None)  # fmt: skip
        ctx.products, ctx.missed = products, missed
        ctx.meta = (scaling, act, has_lora, x.shape[0])
        ctx.mark_non_differentiable(sums)
        return y, sums

    @staticmethod
    def backward(ctx, dy, _dsums):
        xs, gu, hidden, out, xa, ha, gates, a1, b1, a2, b2, gate_up, down, x = ctx.saved_tensors
        products, missed = ctx.products, ctx.missed
        plan = products.plan
        scaling, act, has_lora, num_tokens = ctx.meta
        d = down.shape[2]
        dys = dy.index_select(0, plan.tokens)
        dgates = (dys * out).sum(1) if ctx.needs_input_grad[1] else None
        dout = dys * gates[:, None]
        dhidden = products.rows(dout, down)  # [A, d]
        da1 = db1 = da2 = db2 = t1 = t2 = None
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
        if missed is not None:
            # the gate is part of each assignment's gradient: dout = g dy gives t2 and dgu; ha * g for B2
            accumulate_missed_tokens(
                missed.sink, missed.q, plan.tokens, x=x, dy=dy, dz=dgu, xa=xa, t1=t1, u=hidden, t2=t2,
                ua=ha * gates[:, None], scaling=scaling,
            )  # fmt: skip
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dxs.new_zeros(num_tokens, dxs.shape[1]).index_add_(0, plan.tokens, dxs)
        return (dx, dgates, da1, db1, da2, db2) + (None,) * 8

