"""The SparseMoE feed-forward block: router, experts cut from a dense FFN, dispatch, telemetry.

The experts run in the kernels of :mod:`ubsmoe.smoe.kernels` (sorted dispatch for ``K < M``,
the dense FFN for ``K = M``), so a client with ``K`` of ``M`` experts pays about ``K/M`` of
the FFN.

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

from ubsmoe.smoe.kernels import DenseExperts, DispatchedExperts, DispatchPlan
from ubsmoe.smoe.lora import ExpertLoRA
from ubsmoe.smoe.pseudo_grad import MissedTokenSink, expert_mean_outputs, router_signal, update_defaults
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
    def _add_counts(
        self, counts: torch.Tensor, inactive_mass: torch.Tensor, n: int | torch.Tensor, training: bool
    ) -> None:
        """One pass over ``n`` real tokens: tokens per expert and router mass on inactive experts.

        The masses are summed in ``inactive_mass``'s dtype (the block's choice), then counted in
        float64. ``n`` may be a 0-d device tensor, so a GPU block never waits for the host here.
        """
        if isinstance(n, torch.Tensor):
            n_vec = n.reshape(1).to(inactive_mass.dtype)
        else:
            n_vec = inactive_mass.new_full((1,), n)  # a fill, not a host-to-device copy
        active_mass = n_vec - inactive_mass.sum()  # each real token's probabilities sum to one
        stats = torch.cat([counts.to(inactive_mass.dtype), inactive_mass, n_vec, active_mass,
                           n_vec * self.k]).double()  # fmt: skip
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
            # reference path: the formulas of docs/paper.md literally, in autograd
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
