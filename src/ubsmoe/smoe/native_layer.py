"""The sparse block for natively sparse decoders: the backbone's own router and experts, by reference.

A native MoE decoder (OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral in transformers 5) keeps its
experts as fused stacks ``gate_up_proj [E, 2d, h]`` (gate half first, ``act(gate) * up``) and
``down_proj [E, h, d]``, and its router as ``weight [E, h]``. :class:`NativeSparseMoE` uses
those tensors as they are (the same ``Parameter`` objects, so no copy and no extra memory)
and adds what UB-SMoE needs on top, with the surface of :class:`ubsmoe.smoe.layer.SparseMoE`
(``set_k``, ``phi``, ``router``, ``lora``, counters, PG defaults, ``aux_loss``, ``token_mask``):

- routing: the router logits, DMR-modulated on the candidates (:func:`ubsmoe.smoe.routing.modulate`),
  softmax over the ``E`` experts in float32, the top ``K_c`` among the candidates; the gates are the backbone's own
  (those probabilities, renormalised over the ``K_c`` exactly when the model's config says so).
  At ``K_c`` = the model's top-k, phi = 0 and LoRA B = 0 this is the Hugging Face block.
- dispatch: the ``(token, expert)`` assignments of real tokens sorted by expert, one gather,
  per-expert products on contiguous rows, one ``index_add``: the cost scales with ``K_c``
  (the kernel is :mod:`ubsmoe.smoe.native_kernels`).
- expert LoRA (:class:`NativeExpertLoRA`) on the routed rows only, on gate_up and on down.
- PG: the router signal ``y += sum_{i not active} (p_i - sg p_i) sg(D_i)`` with ``D_i`` the
  running mean of expert ``i``'s (ungated) output on its tokens; the expert signal is applied
  by the caller from the ``"step"`` counters, exactly as for the dense case.
- an optional always-on shared expert with a sigmoid gate (Qwen2-MoE), frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.smoe.layer import Activation, MoEOptions, RoutingCounters
from ubsmoe.smoe.lora import ExpertLoRA
from ubsmoe.smoe.native_kernels import (
    GroupedProducts,
    SegmentProducts,
    SortedAssignments,
    SwiGLUExperts,
    grouped_mm_supported,
)
from ubsmoe.smoe.pseudo_grad import expert_mean_outputs, router_signal, update_defaults
from ubsmoe.smoe.routing import Routing, modulate, num_candidates, switch_balance_loss


def candidate_mask(logits: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """[N, E] bool: each token's top ``n_candidates`` experts of the unmodulated ``logits`` (DMR's T(x))."""
    candidates = logits.detach().topk(n_candidates, dim=-1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, candidates, True)


def recomputing_in_backward() -> bool:
    """True while autograd runs a backward pass: a forward now is activation checkpointing's recompute."""
    return torch._C._current_graph_task_id() != -1


class NativeExpertLoRA(ExpertLoRA):
    """Stacked LoRA of ``E`` SwiGLU experts, expert as dim 0, one rank for all.

    ``lora_A1 [E, r, h]``, ``lora_B1 [E, 2d, r]`` adapt ``gate_up_proj``; ``lora_A2 [E, r, d]``,
    ``lora_B2 [E, h, r]`` adapt ``down_proj``. The names and the meaning of each position are
    those of :class:`ubsmoe.smoe.lora.ExpertLoRA` (first matrix, second matrix), so the model,
    the strategies, the rank limiter and PG treat both alike. ``B`` starts at zero; ``A`` is
    drawn from ``generator`` with peft's bound.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        expert_size: int,
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(num_experts, hidden_size, expert_size, rank, alpha, generator,
                         first_out=2 * expert_size, device=device, dtype=dtype)  # fmt: skip


@dataclass(frozen=True)
class NativeRouting:
    """How a family turns router probabilities into gates (read from the model's config)."""

    top_k: int  # the model's configured experts per token
    renormalize: bool  # divide the top-K_c probabilities by their sum
    jitter: float = 0.0  # Mixtral's multiplicative input noise in training (0 = off)


class NativeSparseMoE(RoutingCounters, nn.Module):
    """Drop-in for a transformers 5 ``*SparseMoeBlock``: ``[B, L, h] -> [B, L, h]``.

    ``router`` is the backbone's router module (its ``weight`` is the same Parameter, now
    trainable), ``experts`` the backbone's experts module (its stacks frozen, used by
    reference), ``shared_expert``/``shared_expert_gate`` the backbone's (Qwen2-MoE) or ``None``.
    Set ``token_mask`` ([B, L] bool) before a forward pass with padding: padding tokens are
    never dispatched nor counted (the shared expert still runs on them, as in the backbone).
    """

    def __init__(
        self,
        router: nn.Module,
        experts: nn.Module,
        *,
        rule: NativeRouting,
        activation: Activation,
        k_max: int | None = None,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
        options: MoEOptions | None = None,
        generator: torch.Generator | None = None,
        lora_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        options = options or MoEOptions()
        gate_up, down = experts.gate_up_proj, experts.down_proj
        e, two_d, h = gate_up.shape
        if two_d % 2 or tuple(down.shape) != (e, h, two_d // 2) or tuple(router.weight.shape) != (e, h):
            raise ValueError(
                f"expected gate_up_proj [E, 2d, h], down_proj [E, h, d], router [E, h]; got {tuple(gate_up.shape)}, "
                f"{tuple(down.shape)}, {tuple(router.weight.shape)}"
            )
        k_max = rule.top_k if k_max is None else int(k_max)
        if not 1 <= k_max <= e:
            raise ValueError(f"k_max={k_max} must lie in [1, {e}]")
        self.num_experts, self.expert_size, self.hidden_size = e, two_d // 2, h
        self.rule = rule
        self.options = options
        self.activation = activation
        self.k_max = k_max
        self.k = min(rule.top_k, k_max)
        self.tier_index = 0
        self.dispatch = "sorted"  # "sorted" (SwiGLUExperts kernel) | "autograd" (reference, for tests)
        # the kernel's products: False = a loop of mm per expert (tested everywhere); True =
        # torch's grouped_mm where dtype and alignment allow (fewer launches on a GPU; not run on one here)
        self.grouped_mm = False
        self.token_mask: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self._signal_defaults: torch.Tensor | None = None  # the D_i this step's router signal used
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        device = gate_up.device
        self.phi = nn.Parameter(torch.zeros(e, device=device), requires_grad=options.dmr)
        self.lora = None
        if options.lora_rank > 0:
            self.lora = NativeExpertLoRA(
                e, h, self.expert_size, options.lora_rank, options.lora_alpha, generator, device=device, dtype=lora_dtype
            )
        self.tier_scale = nn.Parameter(torch.ones(options.num_tiers, device=device)) if options.num_tiers > 0 else None
        self.register_buffer("pg_default", torch.zeros(e, h, device=device))
        self.register_buffer("pg_default_ready", torch.zeros(e, dtype=torch.bool, device=device))
        self._init_counters(device)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, k={self.k}, k_max={self.k_max}, top_k={self.rule.top_k}, "
            f"renormalize={self.rule.renormalize}, expert_size={self.expert_size}, dispatch={self.dispatch}"
        )

    # ----------------------------------------------------------------- configuration
    def set_k(self, k: int) -> None:
        """Run ``k`` experts per token (a client's ``K_c``), ``1 <= k <= k_max``."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.k_max:
            raise ValueError(f"k={k!r} must be an integer in [1, k_max={self.k_max}]")
        self.k = k

    # ----------------------------------------------------------------- routing
    def _valid(self, num_tokens: int) -> torch.Tensor | None:
        if self.token_mask is None:
            return None
        valid = self.token_mask.reshape(-1).bool()
        if valid.shape[0] != num_tokens:
            raise ValueError(
                f"token_mask has {valid.shape[0]} entries for {num_tokens} tokens (set token_mask = None for "
                "generation, or to this batch's [batch, length] mask)"
            )
        return None if bool(valid.all()) else valid

    def route(self, x: torch.Tensor) -> tuple[Routing, torch.Tensor]:
        """Routing of ``x [N, h]`` at the current K, and the gates ``[N, K]`` of its active experts."""
        k, e = self.k, self.num_experts
        # The logits in x's dtype, as the backbones compute them (a float32 router on a bf16 model
        # included), then in float32 at least, where the backbones take their softmax (float64
        # stays float64, for exact references); phi acts at that precision.
        logits = F.linear(x, self.router.weight.to(x.dtype))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        candidates = None
        if self.options.dmr:
            n_candidates = num_candidates(k, e, self.options.np_ratio)
            if n_candidates < e:
                candidates = candidate_mask(logits, n_candidates)
            logits = modulate(logits, self.phi.to(logits.dtype), self.options.kappa, n_candidates)
        probs = torch.softmax(logits, dim=-1)
        # the active set is the top K among the candidates T(x) (DESIGN.md section 3): a
        # negative phi can push a candidate down but never let a non-candidate in
        selection = probs.detach() if candidates is None else probs.detach().masked_fill(~candidates, -1.0)
        experts = selection.topk(k, dim=-1).indices
        top = probs.gather(-1, experts)
        if self.rule.renormalize:
            top = top / top.sum(dim=-1, keepdim=True)
        active = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, experts, True)
        return Routing(logits=logits, probs=probs, experts=experts, active=active), top.to(x.dtype)

    def sort_assignments(
        self, experts: torch.Tensor, gates: torch.Tensor, valid: torch.Tensor | None
    ) -> SortedAssignments:
        """Sort the (token, expert) assignments of the real tokens by expert (stable: tokens ascending)."""
        n, k = experts.shape
        if valid is None:
            flat_experts, flat_gates = experts.reshape(-1), gates.reshape(-1)
            flat_tokens = torch.arange(n, device=experts.device).repeat_interleave(k)
        else:
            token_ids = valid.nonzero().squeeze(1)
            flat_experts = experts.index_select(0, token_ids).reshape(-1)
            flat_gates = gates.index_select(0, token_ids).reshape(-1)
            flat_tokens = token_ids.repeat_interleave(k)
        experts_sorted, order = torch.sort(flat_experts, stable=True)
        counts = torch.bincount(experts_sorted, minlength=self.num_experts)
        return SortedAssignments(flat_tokens.index_select(0, order), flat_gates.index_select(0, order), counts)

    # ----------------------------------------------------------------- experts
    def run_experts(
        self, x: torch.Tensor, plan: SortedAssignments, want_sums: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``sum_e g_e E_e(x)`` over the plan's assignments ``[N, h]``; per-expert sums of the hidden units.

        Computed in the expert stacks' dtype (the adapters and gates are cast to it), returned in ``x``'s.
        """
        if self.dispatch == "autograd":
            return self.run_experts_autograd(x, plan, want_sums)
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        dtype = gate_up.dtype
        if self.lora is not None:
            lora = tuple(t.to(dtype) for t in self.lora.tensors())
            scaling = self.lora.scaling
        else:
            lora, scaling = (None,) * 4, 1.0
        grouped = self.grouped_mm and grouped_mm_supported(x, gate_up, down, *(t for t in lora if t is not None))
        products = GroupedProducts if grouped else SegmentProducts
        y, sums = SwiGLUExperts.apply(
            x.to(dtype), plan.gates.to(dtype), *lora, plan, gate_up.detach(), down.detach(), scaling, self.activation,
            want_sums, products,
        )  # fmt: skip
        return y.to(x.dtype), (sums if want_sums else None)

    def run_experts_autograd(
        self, x: torch.Tensor, plan: SortedAssignments, want_sums: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference dispatch in plain autograd (same sorted segments): what :class:`SwiGLUExperts` computes."""
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        d = self.expert_size
        lora = self.lora
        if lora is not None:
            # unbind once: indexing a stack per expert would make autograd build a full-size
            # zero gradient for every expert (quadratic in E); unbind's backward stacks once
            a1, b1, a2, b2 = (t.to(x.dtype).unbind(0) for t in lora.tensors())
            scaling = lora.scaling
        xs = x.index_select(0, plan.tokens)
        outputs = []
        sums = x.new_zeros(self.num_experts, d) if want_sums else None
        for e, start, count in plan.segments():
            xe = xs[start : start + count]
            gu = F.linear(xe, gate_up[e])
            if lora is not None:
                gu = gu + scaling * F.linear(F.linear(xe, a1[e]), b1[e])
            g, u = gu.split(d, dim=-1)
            hidden = self.activation.forward(g) * u
            out = F.linear(hidden, down[e])
            if lora is not None:
                out = out + scaling * F.linear(F.linear(hidden, a2[e]), b2[e])
            outputs.append(out)
            if sums is not None:
                sums[e] = hidden.detach().sum(0)
        y = x.new_zeros(x.shape)
        if outputs:
            ys = torch.cat(outputs) * plan.gates[:, None]
            y = y.index_add(0, plan.tokens, ys)
        return y, sums

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, self.hidden_size)
        training = self.training and torch.is_grad_enabled()
        # Activation checkpointing runs this forward a second time inside backward: that pass
        # must neither count nor update D_i again, and must see the D_i the first pass used.
        recompute = training and recomputing_in_backward()
        if self.training and self.rule.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.rule.jitter, 1.0 + self.rule.jitter)
            x = x * noise
        n_all = x.shape[0]
        valid = self._valid(n_all)
        routing, gates = self.route(x)
        probs = routing.probs
        plan = self.sort_assignments(routing.experts, gates, valid)
        want_sums = training and self.options.pg_router and not recompute
        y, sums = self.run_experts(x, plan, want_sums)
        inactive = ~routing.active if valid is None else (~routing.active) & valid[:, None]
        if training and self.options.pg_router:
            if not recompute or self._signal_defaults is None:
                self._signal_defaults = self.pg_default.clone()  # D_i is updated in place below
            y = router_signal(y, probs.to(y.dtype), inactive, self._signal_defaults.to(y.dtype))
        if self.tier_scale is not None:
            y = y * self.tier_scale[self.tier_index].to(y.dtype)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        if not recompute:
            if sums is not None:
                self._update_defaults(sums, plan.counts)
            self._record(probs, inactive, plan.counts, valid, training)
        self.aux_loss = None
        if training and self.options.balance_loss:
            self.aux_loss = switch_balance_loss(probs if valid is None else probs[valid], plan.counts, self.k)
        return y.view(shape)

    # ----------------------------------------------------------------- statistics
    @torch.no_grad()
    def _update_defaults(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """``D_i`` <- running mean of expert ``i``'s output (down and its LoRA are linear in the hidden units)."""
        down = self.experts.down_proj
        w2t = down.transpose(1, 2)  # [E, d, h], a view
        lora = None
        if self.lora is not None:
            lora = tuple(t.to(down.dtype) for t in self.lora.tensors())
        means = expert_mean_outputs(sums.to(down.dtype), counts, w2t, lora, self.lora.scaling if self.lora else 1.0)
        means = means.to(self.pg_default.dtype)
        update_defaults(self.pg_default, self.pg_default_ready, means, counts > 0, self.options.pg_momentum)

    @torch.no_grad()
    def _record(
        self,
        probs: torch.Tensor,
        inactive: torch.Tensor,
        counts: torch.Tensor,
        valid: torch.Tensor | None,
        training: bool,
    ) -> None:
        n = probs.shape[0] if valid is None else int(valid.sum())
        self._add_counts(counts, (probs.detach().double() * inactive).sum(0), n, training)  # summed in float64

    def reset_step(self) -> None:
        self.step_counters.zero_()
