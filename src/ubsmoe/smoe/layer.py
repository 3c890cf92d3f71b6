"""The SparseMoE feed-forward block: router, experts cut from a dense FFN, dispatch, telemetry.

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

:func:`masked_loop_experts` is the straightforward reference (a Python loop over experts
with boolean masks, as Hugging Face's eager Mixtral block does, all in autograd, with the
gates and the router signal built literally). Tests check that the kernels give the same
values and gradients; the benchmark times it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.smoe.lora import ExpertLoRA
from ubsmoe.smoe.pseudo_grad import (
    MissedTokenSink,
    accumulate_missed_tokens,
    expert_mean_outputs,
    router_signal,
    update_defaults,
)
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
    num_candidates: int | None = None  # absolute N_p (None: from np_ratio)
    pg_router: bool = True
    pg_expert_sink: bool = False  # collect the missed-token pseudo-gradient directions (PG expert_mode=missed_tokens)
    pg_momentum: float = 0.9
    balance_loss: bool = False
    num_tiers: int = 0  # > 0: a learnable output scale per tier (FLAME)


# Counters, one flat float64 vector per layer: [expert_tokens (M), inactive_mass (M), tokens,
# active_mass, active_assignments]. Two copies: telemetry (until reset) and this step's (PG).
_SCALARS = ("tokens", "active_mass", "active_assignments")


class RoutingCounters:
    """The routing statistics every sparse block keeps (DMR, PG and telemetry read them).

    A mixin for an ``nn.Module`` with ``num_experts`` and ``k``: :meth:`_init_counters` after
    ``nn.Module.__init__``, :meth:`_add_counts` once per forward pass.
    """

    num_experts: int
    k: int
    tel_counters: torch.Tensor
    step_counters: torch.Tensor

    def _init_counters(self, device: torch.device | str | None = None) -> None:
        counters = torch.zeros(2 * self.num_experts + len(_SCALARS), dtype=torch.float64, device=device)
        self.register_buffer("tel_counters", counters, persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("step_counters", counters.clone(), persistent=False)  # type: ignore[attr-defined]

    @torch.no_grad()
    def _add_counts(self, counts: torch.Tensor, inactive_mass: torch.Tensor, n: int, training: bool) -> None:
        """One pass over ``n`` real tokens: tokens per expert and router mass on inactive experts.

        The masses are summed in ``inactive_mass``'s dtype (the block's choice), then counted in float64.
        """
        active_mass = n - inactive_mass.sum()  # each real token's probabilities sum to one
        stats = torch.cat([counts.to(inactive_mass.dtype), inactive_mass, inactive_mass.new_tensor([n]),
                           active_mass.view(1), inactive_mass.new_tensor([n * self.k])]).double()  # fmt: skip
        self.tel_counters.add_(stats)
        if training:
            self.step_counters.add_(stats)

    def counters(self, which: str = "tel") -> dict[str, torch.Tensor]:
        """Accumulated counters: ``"tel"`` (until :meth:`reset_telemetry`) or ``"step"`` (this step's, for PG)."""
        vector = (self.tel_counters if which == "tel" else self.step_counters).clone()
        m = self.num_experts
        out = {"expert_tokens": vector[:m], "inactive_mass": vector[m : 2 * m]}
        out.update({name: vector[2 * m + i] for i, name in enumerate(_SCALARS)})
        out["max_load_fraction"] = out["expert_tokens"].max() / out["tokens"].clamp_min(1.0)
        return out

    def reset_telemetry(self) -> None:
        self.tel_counters.zero_()


class SparseMoE(RoutingCounters, nn.Module):
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
        self.dispatch = "sorted"  # "sorted" (kernels) | "masked_loop" (reference, for tests and benchmarks)
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
        # Output each expert adds when a token skips it (data-driven MoEfication); None = nothing.
        self.register_buffer("skip_default", None)
        self.register_buffer("pg_default", torch.zeros(m, h))
        self.register_buffer("pg_default_ready", torch.zeros(m, dtype=torch.bool))
        self._init_counters()
        self.pg_sink: MissedTokenSink | None = None  # this step's missed-token sums (PG expert_mode=missed_tokens)

    # ----------------------------------------------------------------- configuration
    def set_k(self, k: int) -> None:
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"k={k} must lie in [1, {self.num_experts}]")
        self.k = int(k)

    def set_skip_default(self, defaults: torch.Tensor | None) -> None:
        """``[M, h]``: what expert ``e`` contributes to a token that does not run it (``None`` = zero).

        A GELU neuron that is not computed is not silent: it sits near its typical value.
        :func:`ubsmoe.smoe.coactivation.skip_defaults` estimates each expert's output there;
        adding it for the skipped experts keeps a sparse forward close to the dense one. No
        expert is skipped at ``K = M``, so the dense FFN is still reproduced exactly.
        """
        if defaults is not None and tuple(defaults.shape) != (self.num_experts, self.hidden_size):
            raise ValueError(f"skip defaults of shape {tuple(defaults.shape)}, expected {(self.num_experts, self.hidden_size)}")
        self.skip_default = None if defaults is None else defaults.detach().to(self.w1).clone()

    def _skip_compensation(self, experts: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """``sum over skipped e of skip_default[e]`` per token, as the total minus the active ones.

        A gather and a sum (``K h`` additions per token, no matrix product), zero on padding.
        """
        defaults = self.skip_default
        n, k = experts.shape
        chosen = defaults.index_select(0, experts.reshape(-1)).view(n, k, -1).sum(1)
        out = defaults.sum(0) - chosen
        return out if valid is None else out * valid[:, None].to(out.dtype)

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
        return route(
            logits, self.k, phi=phi, kappa=self.options.kappa, np_ratio=self.options.np_ratio,
            n_candidates=self.options.num_candidates,
        )  # fmt: skip

    def plan(self, routing: Routing, valid: torch.Tensor | None, num_tokens: int) -> tuple[DispatchPlan, torch.Tensor]:
        """Sort the (token, expert) assignments of the dispatched tokens by expert."""
        k, m = routing.experts.shape[1], self.num_experts
        if valid is None:
            flat_experts = routing.experts.reshape(-1)
            flat_tokens = torch.arange(num_tokens, device=flat_experts.device).repeat_interleave(k)
        else:
            token_ids = valid.nonzero().squeeze(1)
            flat_experts = routing.experts.index_select(0, token_ids).reshape(-1)
            flat_tokens = token_ids.repeat_interleave(k)
        experts_sorted, order = torch.sort(flat_experts, stable=True)
        tokens = flat_tokens.index_select(0, order)
        counts = torch.bincount(experts_sorted, minlength=m)
        return DispatchPlan(tokens, tokens * m + experts_sorted, counts.tolist(), num_tokens), counts

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, self.hidden_size)
        n_all = x.shape[0]
        valid = self._valid(n_all)
        routing = self.route(x)
        probs = routing.probs
        training = self.training and torch.is_grad_enabled()
        want_sums = training and self.options.pg_router
        m, k = self.num_experts, self.k
        inactive = None
        if k < m:
            inactive = ~routing.active if valid is None else (~routing.active) & valid[:, None]
        signal = training and self.options.pg_router and k < m
        lora = self.lora.tensors() if self.lora is not None else (None,) * 4
        scaling = self.lora.scaling if self.lora is not None else 1.0
        bias = self.b2 if self.tier_scale is None else None

        sums = None
        if self.dispatch == "masked_loop":
            # reference path: the DESIGN.md formulas literally, in autograd
            y = masked_loop_experts(
                x, routing, unit_gates(probs), self.lora, self.w1, self.b1, self.w2t, self.activation, valid
            )
            counts = (routing.active if valid is None else routing.active & valid[:, None]).sum(0)
            if signal:
                y = router_signal(y, probs, inactive, self.pg_default)
            if bias is not None:
                y = y + bias
        elif k == m:
            valid_f = None if valid is None else valid.to(x.dtype)
            y, sums = DenseExperts.apply(
                x, probs, *lora, self.w1.view(-1, self.hidden_size), self.b1.view(-1),
                self.w2t.view(-1, self.hidden_size), bias, valid_f, m, scaling, self.activation, want_sums,
            )  # fmt: skip
            n_valid = n_all if valid is None else int(valid.sum())
            counts = torch.full((m,), n_valid, dtype=torch.long, device=x.device)
        else:
            plan, counts = self.plan(routing, valid, n_all)
            # the running mean is updated in place below, so the kernel keeps this step's copy
            router_signal_args = (self.pg_default.clone(), inactive.to(x.dtype)) if signal else None
            pg_args = None
            if training and self.options.pg_expert_sink and self.lora is not None:
                if self.pg_sink is None:
                    self.pg_sink = MissedTokenSink()
                pg_args = (self.pg_sink, probs.detach() * inactive.to(probs.dtype))
            y, sums = DispatchedExperts.apply(
                x, probs, *lora, plan, self.w1, self.b1, self.w2t, bias, scaling, self.activation, want_sums,
                router_signal_args, pg_args,
            )  # fmt: skip

        if self.skip_default is not None and k < m:
            y = y + self._skip_compensation(routing.experts, valid)
        if self.tier_scale is not None:
            y = y * self.tier_scale[self.tier_index] + self.b2
        if want_sums and sums is not None:
            self._update_defaults(sums, counts)
        self._record(probs, inactive, counts, valid, training)
        self.aux_loss = None
        if training and self.options.balance_loss:
            self.aux_loss = switch_balance_loss(probs if valid is None else probs[valid], counts, k)
        return y.view(shape)

    # ----------------------------------------------------------------- statistics
    @torch.no_grad()
    def _update_defaults(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        lora = self.lora.tensors() if self.lora is not None else None
        scaling = self.lora.scaling if self.lora is not None else 1.0
        means = expert_mean_outputs(sums, counts, self.w2t, lora, scaling)
        update_defaults(self.pg_default, self.pg_default_ready, means, counts > 0, self.options.pg_momentum)

    @torch.no_grad()
    def _record(
        self,
        probs: torch.Tensor,
        inactive: torch.Tensor | None,
        counts: torch.Tensor,
        valid: torch.Tensor | None,
        training: bool,
    ) -> None:
        n = probs.shape[0] if valid is None else int(valid.sum())
        # summed in the probabilities' dtype (float32), then counted in float64
        inactive_mass = probs.new_zeros(self.num_experts) if inactive is None else (probs.detach() * inactive).sum(0)
        self._add_counts(counts, inactive_mass, n, training)

    def reset_step(self) -> None:
        self.step_counters.zero_()
        self.pg_sink = None
