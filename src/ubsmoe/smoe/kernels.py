"""The expert kernels of :class:`ubsmoe.smoe.layer.SparseMoE`, with hand-written backward passes.

Cost model. A client with ``K`` of ``M`` experts must really pay about ``K/M`` of the FFN,
so the experts never run under a mask. Two kernels, each one ``torch.autograd.Function``
with a hand-written backward (the frozen base weights never enter autograd, which is what
made a slicing-in-autograd prototype slow):

- :class:`DispatchedExperts` (``K < M``): the ``(token, expert)`` assignments are sorted by
  expert; one gather builds the expert-contiguous inputs, each expert runs two matrix
  products on its own contiguous rows, one ``index_add_`` adds the results back.
- :class:`DenseExperts` (``K = M``): every expert sees every token, which is the dense FFN
  itself: two full matrix products over the (permuted) neurons, exactly the backbone's
  computation, with no gather or scatter.

Gates have value exactly 1 (:func:`ubsmoe.smoe.routing.unit_gates`), so the kernels never
multiply by them. They take the router probabilities ``p`` instead and return the gradient
the gates would have sent to ``p``: ``dL/dg_e = <u_e, dL/du_e>`` on each active pair (``u_e``
the expert's hidden activations), plus the PG router signal's ``<dL/dy, D_i>`` on inactive
pairs (:func:`ubsmoe.smoe.pseudo_grad.router_signal`), without building either in autograd.
The activation ``act`` is a :class:`ubsmoe.smoe.layer.Activation` (its fused backward is used).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ubsmoe.smoe.pseudo_grad import accumulate_missed_tokens


@dataclass
class DispatchPlan:
    """Where each (token, expert) assignment goes, sorted by expert."""

    tokens: torch.Tensor  # [A] token of each assignment
    prob_index: torch.Tensor  # [A] flat index ``token * M + expert`` into the router probabilities
    counts: list[int]  # assignments per expert
    num_tokens: int  # N, all tokens of the batch (padding included)

    def segments(self) -> list[tuple[int, int, int]]:
        """(expert, first row, number of rows) for each expert that received rows."""
        out, start = [], 0
        for expert, count in enumerate(self.counts):
            if count:
                out.append((expert, start, count))
            start += count
        return out


class DispatchedExperts(torch.autograd.Function):
    """``K < M``: run each expert on its own tokens only (sorted dispatch, manual backward).

    Inputs: ``x [N, h]``; the router probabilities ``probs [N, M]``; the four stacked LoRA
    tensors (or ``None``); a :class:`DispatchPlan`; the frozen ``w1 [M, d_e, h]``,
    ``b1 [M, d_e]``, ``w2t [M, d_e, h]``; the shared bias (or ``None``); the LoRA scaling;
    the activation; whether to return the per-expert sums of hidden activations; and the
    PG router signal ``(D [M, h], inactive [N, M])`` or ``None``; and the PG expert signal's
    ``(MissedTokenSink, q [N, M])`` or ``None`` (the backward pass then adds the missed-token
    sums to the sink). Returns ``y [N, h]`` and the sums ``[M, d_e]`` (no gradient).

    The gradient for ``probs`` is that of the unit gates (``<u_e, dL/du_e>`` on each active
    pair) plus, with the router signal, ``<dL/dy, D_i>`` on inactive pairs: exactly what
    ``unit_gates`` and ``router_signal`` give in autograd, without building either.
    """

    @staticmethod
    def forward(ctx, x, probs, a1, bl1, a2, bl2, plan, w1, b1, w2t, bias, scaling, act, want_sums, signal, pg):
        num_experts, expert_size, hidden = w1.shape
        segments = plan.segments()
        has_lora = a1 is not None
        total = plan.tokens.shape[0]
        xs = x.index_select(0, plan.tokens)
        z = x.new_empty(total, expert_size)
        xa = x.new_empty(total, a1.shape[1]) if has_lora else None
        for e, start, count in segments:
            rows = slice(start, start + count)
            torch.addmm(b1[e], xs[rows], w1[e].t(), out=z[rows])
            if has_lora:
                torch.mm(xs[rows], a1[e].t(), out=xa[rows])
                z[rows].addmm_(xa[rows], bl1[e].t(), alpha=scaling)
        u = act.forward(z)
        ys = x.new_empty(total, hidden)
        ua = x.new_empty(total, a2.shape[1]) if has_lora else None
        for e, start, count in segments:
            rows = slice(start, start + count)
            torch.mm(u[rows], w2t[e], out=ys[rows])
            if has_lora:
                torch.mm(u[rows], a2[e].t(), out=ua[rows])
                ys[rows].addmm_(ua[rows], bl2[e].t(), alpha=scaling)
        y = x.new_zeros(x.shape[0], hidden) if bias is None else bias.expand(x.shape[0], hidden).clone()
        y.index_add_(0, plan.tokens, ys)
        sums = x.new_zeros(num_experts, expert_size)
        if want_sums:
            for e, start, count in segments:
                torch.sum(u[start : start + count], dim=0, out=sums[e])
        pg = pg if has_lora else None
        ctx.save_for_backward(xs, z, u, xa, ua, a1, bl1, a2, bl2, w1, w2t, x if pg is not None else None)
        ctx.plan, ctx.signal, ctx.pg = plan, signal, pg
        ctx.meta = (scaling, act, has_lora)
        ctx.mark_non_differentiable(sums)
        return y, sums

    @staticmethod
    def backward(ctx, dy, _dsums):
        xs, z, u, xa, ua, a1, bl1, a2, bl2, w1, w2t, x = ctx.saved_tensors
        plan, signal, pg = ctx.plan, ctx.signal, ctx.pg
        scaling, act, has_lora = ctx.meta
        segments = plan.segments()
        dys = dy.index_select(0, plan.tokens)
        dv = torch.empty_like(u)
        t1_all = t2_all = None
        if pg is not None:  # keep t1 = dz B1 and t2 = dy B2 of every assignment for the PG expert signal
            t1_all, t2_all = xa.new_empty(xa.shape), ua.new_empty(ua.shape)
        da1 = dbl1 = da2 = dbl2 = None
        if has_lora:
            # B gradients are computed transposed (products with r output rows are several
            # times faster here than with r output columns), then flipped back
            da1, da2 = torch.zeros_like(a1), torch.zeros_like(a2)
            dbl1_t = torch.zeros_like(bl1.transpose(1, 2), memory_format=torch.contiguous_format)
            dbl2_t = torch.zeros_like(bl2.transpose(1, 2), memory_format=torch.contiguous_format)
        for e, start, count in segments:
            rows = slice(start, start + count)
            torch.mm(dys[rows], w2t[e].t(), out=dv[rows])
            if has_lora:
                t2 = torch.mm(dys[rows], bl2[e])
                if t2_all is not None:
                    t2_all[rows] = t2
                dv[rows].addmm_(t2, a2[e], alpha=scaling)
                torch.mm(t2.t(), u[rows], out=da2[e])
                torch.mm(ua[rows].t(), dys[rows], out=dbl2_t[e])
        dz = act.backward(dv, z)
        dxs = torch.empty_like(xs)
        for e, start, count in segments:
            rows = slice(start, start + count)
            torch.mm(dz[rows], w1[e], out=dxs[rows])
            if has_lora:
                t1 = torch.mm(dz[rows], bl1[e])
                if t1_all is not None:
                    t1_all[rows] = t1
                dxs[rows].addmm_(t1, a1[e], alpha=scaling)
                torch.mm(t1.t(), xs[rows], out=da1[e])
                torch.mm(xa[rows].t(), dz[rows], out=dbl1_t[e])
        if pg is not None:
            sink, q = pg
            accumulate_missed_tokens(
                sink, q, plan.tokens, x=x, dy=dy, dz=dz, xa=xa, t1=t1_all, u=u, t2=t2_all, ua=ua, scaling=scaling,
            )  # fmt: skip
        if has_lora:
            da1.mul_(scaling)
            da2.mul_(scaling)
            dbl1 = dbl1_t.transpose(1, 2).mul(scaling).contiguous()
            dbl2 = dbl2_t.transpose(1, 2).mul(scaling).contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dxs.new_zeros(plan.num_tokens, dxs.shape[1]).index_add_(0, plan.tokens, dxs)
        dprobs = None
        if ctx.needs_input_grad[1]:
            num_experts = w1.shape[0]
            dgates = (dv * u).sum(dim=1)  # unit gates: dL/dg = <dL/du, u>
            dprobs = dy.new_zeros(plan.num_tokens * num_experts).index_copy_(0, plan.prob_index, dgates)
            dprobs = dprobs.view(plan.num_tokens, num_experts)
            if signal is not None:
                defaults, inactive = signal
                dprobs.addcmul_(dy @ defaults.t(), inactive)
        return (dx, dprobs, da1, dbl1, da2, dbl2) + (None,) * 10


class DenseExperts(torch.autograd.Function):
    """``K = M``: all experts on all tokens, i.e. the dense FFN over the permuted neurons.

    Inputs: ``x [N, h]``, ``probs [N, M]`` (every pair is active: its gradient is the unit
    gates' ``<u_e, dL/du_e>``), the LoRA tensors, flat frozen weights ``w1 [d, h]``, ``b1 [d]``,
    ``w2t [d, h]`` (the stacked ones viewed flat, no copy), the shared bias, ``valid [N]``
    (float, or ``None`` = all) to weight the per-expert sums of ``u``, then as
    :class:`DispatchedExperts`.
    """

    @staticmethod
    def forward(ctx, x, probs, a1, bl1, a2, bl2, w1, b1, w2t, bias, valid, num_experts, scaling, act, want_sums):
        n = x.shape[0]
        d = w1.shape[0]
        m = num_experts
        de = d // m
        has_lora = a1 is not None
        z = torch.addmm(b1, x, w1.t())
        xa = ua_cat = None
        if has_lora:
            r = a1.shape[1]
            xa = torch.mm(x, a1.reshape(m * r, -1).t())  # [N, M r]
            delta = torch.bmm(xa.view(n, m, r).transpose(0, 1), bl1.transpose(1, 2))  # [M, N, de]
            z.view(n, m, de).add_(delta.transpose(0, 1), alpha=scaling)
        u = act.forward(z)
        y = torch.mm(u, w2t) if bias is None else torch.addmm(bias, u, w2t)
        if has_lora:
            ua = torch.bmm(u.view(n, m, de).transpose(0, 1), a2.transpose(1, 2))  # [M, N, r]
            ua_cat = ua.transpose(0, 1).reshape(n, m * r)
            y.addmm_(ua_cat, bl2.transpose(1, 2).reshape(m * r, -1), alpha=scaling)
        if want_sums:
            sums = (u.sum(0) if valid is None else valid.to(u.dtype) @ u).view(m, de)
        else:
            sums = x.new_zeros(m, de)
        ctx.save_for_backward(x, z, u, xa, ua_cat, a1, bl1, a2, bl2, w1, w2t)
        ctx.meta = (m, scaling, act, has_lora)
        ctx.mark_non_differentiable(sums)
        return y, sums

    @staticmethod
    def backward(ctx, dy, _dsums):
        x, z, u, xa, ua_cat, a1, bl1, a2, bl2, w1, w2t = ctx.saved_tensors
        m, scaling, act, has_lora = ctx.meta
        n, d = u.shape
        de = d // m
        dv = torch.mm(dy, w2t.t())
        da1 = dbl1 = da2 = dbl2 = None
        if has_lora:
            r = a1.shape[1]
            b2_flat = bl2.transpose(1, 2).reshape(m * r, -1)  # [M r, h]
            t2 = torch.mm(dy, b2_flat.t())  # [N, M r]
            t2_by_expert = t2.view(n, m, r).transpose(0, 1)  # [M, N, r]
            dv.view(n, m, de).add_(torch.bmm(t2_by_expert, a2).transpose(0, 1), alpha=scaling)
            dbl2 = torch.mm(ua_cat.t(), dy).view(m, r, -1).transpose(1, 2).mul(scaling).contiguous()
            da2 = torch.bmm(t2_by_expert.transpose(1, 2), u.view(n, m, de).transpose(0, 1)).mul_(scaling)
        dprobs = (dv * u).view(n, m, de).sum(-1) if ctx.needs_input_grad[1] else None
        dz = act.backward(dv, z)
        dx = torch.mm(dz, w1) if ctx.needs_input_grad[0] or has_lora else None
        if has_lora:
            dz_by_expert = dz.view(n, m, de).transpose(0, 1)  # [M, N, de]
            t1 = torch.bmm(dz_by_expert, bl1)  # [M, N, r]
            t1_cat = t1.transpose(0, 1).reshape(n, m * r)
            a1_flat = a1.reshape(m * r, -1)
            dx.addmm_(t1_cat, a1_flat, alpha=scaling)
            da1 = torch.mm(t1_cat.t(), x).view(m, r, -1).mul_(scaling)
            dbl1 = torch.bmm(dz_by_expert.transpose(1, 2), xa.view(n, m, r).transpose(0, 1)).mul_(scaling)
        if not ctx.needs_input_grad[0]:
            dx = None
        return (dx, dprobs, da1, dbl1, da2, dbl2) + (None,) * 9
