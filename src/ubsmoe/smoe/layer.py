"""The SparseMoE feed-forward block: router, experts cut from a dense FFN, dispatch, telemetry.

Cost model. A client with ``K`` of ``M`` experts must really pay about ``K/M`` of the FFN,
so the experts never run under a mask. Two kernels, each one ``torch.autograd.Function``
with a hand-written backward (the frozen base weights never enter autograd, which is what
made a slicing-in-autograd prototype slow):

- :class:`DispatchedExperts` (``K < M``): the ``(token, expert)`` assignments are sorted by
  expert; one gather builds the expert-contiguous inputs, each expert runs two matrix
  products on its own contiguous rows, one ``index_add_`` scatters the results back.
- :class:`DenseExperts` (``K = M``): every expert sees every token, which is the dense FFN
  itself: two full matrix products over the (permuted) neurons, exactly the backbone's
  computation, with no gather or scatter.

Gates have value exactly 1 (:func:`ubsmoe.smoe.routing.unit_gates`), so the kernels never
multiply by them; their backward returns ``dL/dg_e = <u_e, dL/du_e>`` for each assignment,
which is what the router learns from. ``u_e`` are the expert's hidden activations.

:func:`masked_loop_experts` is the straightforward reference (a Python loop over experts
with boolean masks, as Hugging Face's eager Mixtral block does, all in autograd). Tests use
it to check the kernels' values and gradients; the benchmark times it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.smoe.lora import ExpertLoRA
from ubsmoe.smoe.pseudo_grad import expert_mean_outputs, router_signal, update_defaults
from ubsmoe.smoe.routing import Routing, route, switch_balance_loss, unit_gates


class Activation:
    """An elementwise activation with an explicit backward, so the kernels can fuse it.

    Known names use PyTorch's fused forward/backward ops. Any other callable falls back
    to recomputing it under autograd in the backward pass (correct, a little slower).
    """

    _FUSED = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "relu": "relu", "silu": "silu", "swish": "silu"}

    def __init__(self, name: str | None, module: nn.Module | None = None) -> None:
        self.name = name
        self.kind = self._FUSED.get(name or "")
        self.module = module
        if self.kind is None and module is None:
            raise ValueError(f"activation {name!r} is not known and no module was given")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind in ("none", "tanh"):
            return F.gelu(z, approximate=self.kind)
        if self.kind == "relu":
            return torch.relu(z)
        if self.kind == "silu":
            return F.silu(z)
        return self.module(z)

    def backward(self, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.kind in ("none", "tanh"):
            return torch.ops.aten.gelu_backward(grad, z, approximate=self.kind)
        if self.kind == "relu":
            return grad * (z > 0).to(grad.dtype)
        if self.kind == "silu":
            return torch.ops.aten.silu_backward(grad, z)
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            (dz,) = torch.autograd.grad(self.module(zz), zz, grad)
        return dz


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, number of rows) for each expert that received rows."""
    out, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            out.append((expert, start, count))
        start += count
    return out


def _combine(
    rows: torch.Tensor,
    combine_index: torch.Tensor,
    k: int,
    token_ids: torch.Tensor | None,
    num_tokens: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Sum each token's ``k`` expert rows back into token order (a gather, not a scatter).

    ``combine_index[j * k + s]`` is the sorted row of slot ``s`` of the ``j``-th dispatched
    token. Every dispatched token has exactly ``k`` rows, so a gather plus a sum over ``k``
    replaces ``index_add_`` (which PyTorch runs as a much slower scatter on CPU).
    ``token_ids`` (``None`` = all tokens) says where the dispatched tokens go; the others
    get ``bias`` (or zero).
    """
    gathered = rows.index_select(0, combine_index)
    per_token = gathered if k == 1 or gathered.shape[0] == 0 else gathered.view(-1, k, rows.shape[1]).sum(1)
    if token_ids is None:
        return per_token if bias is None else per_token.add_(bias)
    if bias is None:
        out = rows.new_zeros(num_tokens, rows.shape[1])
    else:
        out = bias.expand(num_tokens, rows.shape[1]).clone()
        per_token.add_(bias)
    return out.index_copy_(0, token_ids, per_token)


class DispatchedExperts(torch.autograd.Function):
    """``K < M``: run each expert on its own tokens only (sorted dispatch, manual backward).

    Inputs: ``x [N, h]``; ``gates [A]`` (unit-valued, one per assignment, in sorted order);
    the four stacked LoRA tensors (or ``None``); the frozen ``w1 [M, d_e, h]``,
    ``b1 [M, d_e]``, ``w2t [M, d_e, h]``, optional shared ``bias [h]``; ``tokens [A]`` (the
    token of each assignment, sorted by expert), ``combine_index [A]`` (see :func:`_combine`),
    ``token_ids`` (the dispatched tokens, ``None`` = all), ``counts`` (rows per expert) and ``k``.
    Returns ``y [N, h]`` and, if asked, the per-expert sums of ``u`` ``[M, d_e]`` (no grad).
    """

    @staticmethod
    def forward(
        ctx, x, gates, a1, bl1, a2, bl2, w1, b1, w2t, bias, tokens, combine_index, token_ids, counts, k, scaling,
        act, want_sums,
    ):
        num_experts, expert_size, hidden = w1.shape
        segments = _segments(counts)
        has_lora = a1 is not None
        total = tokens.shape[0]
        xs = x.index_select(0, tokens)
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
        y = _combine(ys, combine_index, k, token_ids, x.shape[0], bias)
        sums = x.new_zeros(num_experts, expert_size)
        if want_sums:
            for e, start, count in segments:
                torch.sum(u[start : start + count], dim=0, out=sums[e])
        ctx.save_for_backward(xs, z, u, xa, ua, tokens, combine_index, token_ids, a1, bl1, a2, bl2, w1, w2t)
        ctx.meta = (segments, scaling, act, x.shape[0], has_lora, k)
        ctx.mark_non_differentiable(sums)
        return y, sums

    @staticmethod
    def backward(ctx, dy, _dsums):
        xs, z, u, xa, ua, tokens, combine_index, token_ids, a1, bl1, a2, bl2, w1, w2t = ctx.saved_tensors
        segments, scaling, act, num_tokens, has_lora, k = ctx.meta
        dys = dy.index_select(0, tokens)
        dv = torch.empty_like(u)
        grads_lora = [None, None, None, None]
        if has_lora:
            grads_lora = [torch.zeros_like(t) for t in (a1, bl1, a2, bl2)]
        da1, dbl1, da2, dbl2 = grads_lora
        for e, start, count in segments:
            rows = slice(start, start + count)
            torch.mm(dys[rows], w2t[e].t(), out=dv[rows])
            if has_lora:
                t2 = torch.mm(dys[rows], bl2[e])
                dv[rows].addmm_(t2, a2[e], alpha=scaling)
                torch.mm(t2.t(), u[rows], out=da2[e])
                torch.mm(dys[rows].t(), ua[rows], out=dbl2[e])
        dgates = (dv * u).sum(dim=1) if ctx.needs_input_grad[1] else None
        dz = act.backward(dv, z)
        dxs = torch.empty_like(xs)
        for e, start, count in segments:
            rows = slice(start, start + count)
            torch.mm(dz[rows], w1[e], out=dxs[rows])
            if has_lora:
                t1 = torch.mm(dz[rows], bl1[e])
                dxs[rows].addmm_(t1, a1[e], alpha=scaling)
                torch.mm(t1.t(), xs[rows], out=da1[e])
                torch.mm(dz[rows].t(), xa[rows], out=dbl1[e])
        if has_lora:
            for g in grads_lora:
                g.mul_(scaling)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _combine(dxs, combine_index, k, token_ids, num_tokens, None)
        return (dx, dgates, da1, dbl1, da2, dbl2) + (None,) * 13


class DenseExperts(torch.autograd.Function):
    """``K = M``: all experts on all tokens, i.e. the dense FFN over the permuted neurons.

    Inputs as :class:`DispatchedExperts` but ``gates [N, M]`` and flat frozen weights
    ``w1 [d, h]``, ``b1 [d]``, ``w2t [d, h]`` (the stacked ones viewed flat, no copy).
    ``valid [N]`` (float, or ``None`` = all) weights the per-expert sums of ``u``.
    """

    @staticmethod
    def forward(ctx, x, gates, a1, bl1, a2, bl2, w1, b1, w2t, bias, valid, num_experts, scaling, act, want_sums):
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
        dgates = (dv * u).view(n, m, de).sum(-1) if ctx.needs_input_grad[1] else None
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
        return (dx, dgates, da1, dbl1, da2, dbl2) + (None,) * 9


def masked_loop_experts(
    x: torch.Tensor,
    routing: Routing,
    gates: torch.Tensor,
    lora: ExpertLoRA | None,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2t: torch.Tensor,
    act: Activation,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference dispatch in plain autograd: a loop over experts with boolean masks.

    Each expert finds its tokens with ``torch.where`` on the one-hot routing mask, slices its
    weights inside autograd, and ``index_add_``s its gated output. Same math as the kernels.
    """
    num_experts = w1.shape[0]
    active = routing.active if valid is None else routing.active & valid[:, None]
    out = torch.zeros_like(x)
    for e in range(num_experts):
        (token_idx,) = torch.where(active[:, e])
        if token_idx.numel() == 0:
            continue
        xe = x[token_idx]
        z = F.linear(xe, w1[e], b1[e])
        if lora is not None:
            z = z + lora.scaling * F.linear(F.linear(xe, lora.lora_A1[e]), lora.lora_B1[e])
        u = act.forward(z) * gates[token_idx, e, None]
        y = u @ w2t[e]
        if lora is not None:
            y = y + lora.scaling * F.linear(F.linear(u, lora.lora_A2[e]), lora.lora_B2[e])
        out = out.index_add(0, token_idx, y)
    return out


@dataclass
class MoEOptions:
    """What a SparseMoE block does besides the experts (built from the run's settings)."""

    lora_rank: int = 8  # 0 = no expert LoRA
    lora_alpha: float = 16.0
    dmr: bool = True
    kappa: float = 1.0
    np_ratio: float = 2.0
    pg_router: bool = True
    pg_momentum: float = 0.9
    balance_loss: bool = False
    num_tiers: int = 0  # > 0: a learnable output scale per tier (FLAME)


_COUNTER_NAMES = ("expert_tokens", "tokens", "inactive_mass", "active_mass", "active_assignments")


class SparseMoE(nn.Module):
    """An FFN cut into ``M`` experts with top-``K`` routing; drop-in for a BERT ``intermediate``.

    Input and output are ``[..., h]``: the block computes ``sum_e g_e E_e(x) + b2``, the
    second matrix's bias included, so the backbone's ``output.dense`` becomes an identity
    and its dropout, residual and LayerNorm stay where they were.

    Set ``token_mask`` ([batch, length] bool) before the forward pass: padding tokens are
    never dispatched (they get only ``b2``) and never counted in the telemetry.
    """

    def __init__(
        self,
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
        *,
        num_experts: int,
        activation: Activation,
        options: MoEOptions | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        options = options or MoEOptions()
        d, h = w1.shape
        if d % num_experts:
            raise ValueError(f"{num_experts} experts do not divide the FFN width {d}")
        m, de = num_experts, d // num_experts
        self.num_experts, self.expert_size, self.hidden_size = m, de, h
        self.options = options
        self.activation = activation
        self.k = m
        self.tier_index = 0
        self.dispatch = "sorted"  # "sorted" (kernels) | "masked_loop" (reference, for benchmarks)
        self.token_mask: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        # Frozen base weights, contiguous per expert: slicing them costs nothing.
        self.register_buffer("w1", w1.detach().reshape(m, de, h).contiguous())
        self.register_buffer("b1", b1.detach().reshape(m, de).contiguous())
        self.register_buffer("w2t", w2.detach().t().reshape(m, de, h).contiguous())
        self.register_buffer("b2", b2.detach().clone())
        self.router = nn.Linear(h, m, bias=False)
        nn.init.zeros_(self.router.weight)
        self.phi = nn.Parameter(torch.zeros(m), requires_grad=options.dmr)
        self.lora = (
            ExpertLoRA(m, h, de, options.lora_rank, options.lora_alpha, generator) if options.lora_rank > 0 else None
        )
        self.tier_scale = nn.Parameter(torch.ones(options.num_tiers)) if options.num_tiers > 0 else None
        self.register_buffer("pg_default", torch.zeros(m, h))
        self.register_buffer("pg_default_ready", torch.zeros(m, dtype=torch.bool))
        for prefix in ("tel_", "step_"):
            for name in _COUNTER_NAMES:
                shape = (m,) if name in ("expert_tokens", "inactive_mass") else ()
                self.register_buffer(prefix + name, torch.zeros(shape, dtype=torch.float64), persistent=False)

    # ----------------------------------------------------------------- configuration
    def set_k(self, k: int) -> None:
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"k={k} must lie in [1, {self.num_experts}]")
        self.k = int(k)

    # ----------------------------------------------------------------- forward
    def _valid(self, num_tokens: int) -> torch.Tensor | None:
        if self.token_mask is None:
            return None
        valid = self.token_mask.reshape(-1).bool()
        if valid.shape[0] != num_tokens:
            raise ValueError(f"token_mask has {valid.shape[0]} entries for {num_tokens} tokens")
        return None if bool(valid.all()) else valid

    def route(self, x: torch.Tensor) -> Routing:
        logits = F.linear(x, self.router.weight)
        phi = self.phi if self.options.dmr else None
        return route(logits, self.k, phi=phi, kappa=self.options.kappa, np_ratio=self.options.np_ratio)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, self.hidden_size)
        n_all = x.shape[0]
        valid = self._valid(n_all)
        routing = self.route(x)
        gates = unit_gates(routing.probs)
        training = self.training and torch.is_grad_enabled()
        want_sums = training and self.options.pg_router
        bias = self.b2 if self.tier_scale is None else None
        lora = self.lora.tensors() if self.lora is not None else (None,) * 4
        scaling = self.lora.scaling if self.lora is not None else 1.0
        m, k = self.num_experts, self.k

        if self.dispatch == "masked_loop":
            y = masked_loop_experts(x, routing, gates, self.lora, self.w1, self.b1, self.w2t, self.activation, valid)
            counts = (routing.active if valid is None else routing.active & valid[:, None]).sum(0)
            sums = None
            if bias is not None:
                y = y + bias
        elif k == m:
            valid_f = None if valid is None else valid.to(x.dtype)
            y, sums = DenseExperts.apply(
                x, gates, *lora, self.w1.view(-1, self.hidden_size), self.b1.view(-1),
                self.w2t.view(-1, self.hidden_size), bias, valid_f, m, scaling, self.activation, want_sums,
            )  # fmt: skip
            n_valid = n_all if valid is None else int(valid.sum())
            counts = torch.full((m,), n_valid, dtype=torch.long, device=x.device)
        else:
            token_ids = None if valid is None else valid.nonzero().squeeze(1)
            if token_ids is None:
                flat_experts = routing.experts.reshape(-1)
                flat_tokens = torch.arange(n_all, device=x.device).repeat_interleave(k)
            else:
                flat_experts = routing.experts.index_select(0, token_ids).reshape(-1)
                flat_tokens = token_ids.repeat_interleave(k)
            order = torch.argsort(flat_experts, stable=True)
            combine_index = torch.empty_like(order)
            combine_index[order] = torch.arange(order.shape[0], device=x.device)
            tokens_sorted = flat_tokens.index_select(0, order)
            experts_sorted = flat_experts.index_select(0, order)
            counts = torch.bincount(flat_experts, minlength=m)
            gates_sorted = gates.reshape(-1).index_select(0, tokens_sorted * m + experts_sorted)
            y, sums = DispatchedExperts.apply(
                x, gates_sorted, *lora, self.w1, self.b1, self.w2t, bias, tokens_sorted, combine_index, token_ids,
                counts.tolist(), k, scaling, self.activation, want_sums,
            )  # fmt: skip

        if self.tier_scale is not None:
            y = y * self.tier_scale[self.tier_index] + self.b2
        if training and self.options.pg_router and k < m:
            inactive = ~routing.active if valid is None else (~routing.active) & valid[:, None]
            y = router_signal(y, routing.probs, inactive, self.pg_default)
        if want_sums and sums is not None:
            self._update_defaults(sums, counts)
        self._record(routing, counts, valid, training)
        self.aux_loss = None
        if training and self.options.balance_loss:
            probs = routing.probs if valid is None else routing.probs[valid]
            self.aux_loss = switch_balance_loss(probs, counts, k)
        return y.view(shape)

    # ----------------------------------------------------------------- statistics
    @torch.no_grad()
    def _update_defaults(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        lora = self.lora.tensors() if self.lora is not None else None
        scaling = self.lora.scaling if self.lora is not None else 1.0
        means = expert_mean_outputs(sums, counts, self.w2t, lora, scaling)
        update_defaults(self.pg_default, self.pg_default_ready, means, counts > 0, self.options.pg_momentum)

    @torch.no_grad()
    def _record(self, routing: Routing, counts: torch.Tensor, valid: torch.Tensor | None, training: bool) -> None:
        probs = routing.probs.detach()
        active = routing.active
        if valid is not None:
            probs, active = probs[valid], active[valid]
        n = probs.shape[0]
        inactive_mass = probs.masked_fill(active, 0.0).sum(0).double()
        active_mass = probs.masked_fill(~active, 0.0).sum().double()
        prefixes = ("tel_", "step_") if training else ("tel_",)
        for prefix in prefixes:
            getattr(self, prefix + "expert_tokens").add_(counts.double())
            getattr(self, prefix + "tokens").add_(n)
            getattr(self, prefix + "inactive_mass").add_(inactive_mass)
            getattr(self, prefix + "active_mass").add_(active_mass)
            getattr(self, prefix + "active_assignments").add_(n * self.k)

    def counters(self, which: str = "tel") -> dict[str, torch.Tensor]:
        """Accumulated counters: ``"tel"`` (until :meth:`reset_telemetry`) or ``"step"`` (this step)."""
        out = {name: getattr(self, f"{which}_{name}").clone() for name in _COUNTER_NAMES}
        out["max_load_fraction"] = out["expert_tokens"].max() / out["tokens"].clamp_min(1.0)
        return out

    def reset_telemetry(self) -> None:
        for name in _COUNTER_NAMES:
            getattr(self, "tel_" + name).zero_()

    def reset_step(self) -> None:
        for name in _COUNTER_NAMES:
            getattr(self, "step_" + name).zero_()
