"""The sparse block for natively sparse decoders: the backbone's own router and experts, by reference.

A native MoE decoder (OLMoE, Qwen2-MoE, Qwen3-MoE, Mixtral in transformers 5) keeps its
experts as fused stacks ``gate_up_proj [E, 2d, h]`` (gate half first, ``act(gate) * up``) and
``down_proj [E, h, d]``, and its router as ``weight [E, h]``. :class:`NativeSparseMoE` uses
those tensors as they are (the same ``Parameter`` objects, so no copy and no extra memory)
and adds what UB-SMoE needs on top, with the surface of :class:`ubsmoe.smoe.layer.SparseMoE`
(``set_k``, ``phi``, ``router``, ``lora``, counters, PG defaults, ``aux_loss``, ``token_mask``):

- routing: the router logits, DMR-modulated on the candidates ``T(x)`` (the top
  ``max(K_c, N_p)`` logits, ``N_p`` = ``method.dmr.num_candidates`` or ``ceil(np_ratio K_c)``,
  the encoders' rule: :func:`ubsmoe.smoe.routing.num_candidates`), softmax over the ``E``
  experts in float32, the top ``K_c`` among the candidates; the gates are the backbone's own
  (those probabilities, renormalised over the ``K_c`` exactly when the model's config says so),
  or always renormalised with ``gate_norm="renormalize"`` (:class:`NativeSparseMoE`).
  At ``K_c`` = the model's top-k, phi = 0 and LoRA B = 0 this is the Hugging Face block.
- dispatch: the ``(token, expert)`` assignments sorted by expert (padding's behind all
  others), one gather, grouped products over the expert segments (or a loop of them), one
  ``index_add``: the cost scales with ``K_c`` and nothing waits for the host
  (the kernel is :mod:`ubsmoe.smoe.native_kernels`, chosen by ``expert_kernel``).
- expert LoRA (:class:`NativeExpertLoRA`) on the routed rows only, on gate_up and on down.
- PG: the router signal ``y += sum_{i not active} (p_i - sg p_i) sg(D_i)`` with ``D_i`` the
  running mean of expert ``i``'s (ungated) output on its tokens; the expert signal in either
  mode of ``method.pg.expert_mode``: ``missed_tokens`` (the kernel's backward pass fills
  :attr:`NativeSparseMoE.pg_sink`, applied after the optimizer step by the model, as for
  the encoders) or ``shared_mean`` (from the ``"step"`` counters before the step).
- an optional always-on shared expert with a sigmoid gate (Qwen2-MoE), frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.names import EXPERT_KERNELS, GATE_NORMS
from ubsmoe.smoe.layer import Activation, MoEOptions, RoutingCounters
from ubsmoe.smoe.lora import ExpertLoRA
from ubsmoe.smoe.native_kernels import (
    MissedTokenArgs,
    SortedAssignments,
    SwiGLUExperts,
    products_class,
    sort_assignments,
)
from ubsmoe.smoe.pseudo_grad import MissedTokenSink, expert_mean_outputs, router_signal, update_defaults
from ubsmoe.smoe.routing import Routing, candidate_mask, num_candidates, switch_balance_loss



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

    ``gate_norm`` (``model.gate_norm``) says how the ``K_c`` routing probabilities become gates:

    - ``"model"`` (the default): the family's own rule (OLMoE and Qwen2-MoE renormalise
      exactly when the config's ``norm_topk_prob`` says so, Qwen3-MoE's checkpoints do,
      Mixtral always). Chosen because at ``K_c`` = top-k it is the released model bit for bit
      in every family, so the full-budget tier starts from the checkpoint itself and the
      method changes nothing the paper does not. Its cost: a weak tier of a family that does
      not renormalise (OLMoE) keeps the raw probability mass of its ``K_c`` experts, so its
      MoE output is smaller than the full tier's and its LoRA (and ``tier_scale``, when on)
      must learn the difference.
    - ``"renormalize"``: the ``K_c`` gates are divided by their sum (1 per token in every
      tier), so a weak OLMoE tier keeps the output's scale; at ``K_c`` = top-k this moves
      OLMoE's full tier away from the checkpoint (its top-8 mass is well below 1).

    ``expert_kernel`` (``model.expert_kernel``: ``auto | grouped | loop``) picks the expert
    products (:func:`ubsmoe.smoe.native_kernels.products_class`).
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
        gate_norm: str = "model",
        expert_kernel: str = "auto",
    ) -> None:
        super().__init__()
        options = options or MoEOptions()
        if gate_norm not in GATE_NORMS:
            raise ValueError(f"gate_norm={gate_norm!r} must be one of {GATE_NORMS}")
        if expert_kernel not in EXPERT_KERNELS:
            raise ValueError(f"expert_kernel={expert_kernel!r} must be one of {EXPERT_KERNELS}")
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
        self.gate_norm = gate_norm
        self.renormalize = rule.renormalize or gate_norm == "renormalize"
        self.options = options
        self.activation = activation
        self.k_max = k_max
        self.k = min(rule.top_k, k_max)
        self.tier_index = 0
        self.dispatch = "sorted"  # "sorted" (SwiGLUExperts kernel) | "autograd" (reference, for tests)
        # the kernel's products (native_kernels.products_class): auto = grouped_mm on CUDA where
        # dtype and alignment allow, the loop of mm per expert elsewhere; grouped; loop
        self.expert_kernel = expert_kernel
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
        self.pg_sink: MissedTokenSink | None = None  # this step's missed-token sums (PG expert_mode=missed_tokens)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, k={self.k}, k_max={self.k_max}, top_k={self.rule.top_k}, "
            f"renormalize={self.renormalize}, expert_size={self.expert_size}, dispatch={self.dispatch}, "
            f"expert_kernel={self.expert_kernel}"
        )

    # ----------------------------------------------------------------- configuration
    @property
    def grouped_mm(self) -> bool:
        """Shorthand for ``expert_kernel``: setting True asks for ``"grouped"``, False for ``"loop"``."""
        return self.expert_kernel == "grouped"

    @grouped_mm.setter
    def grouped_mm(self, value: bool) -> None:
        self.expert_kernel = "grouped" if value else "loop"

    def set_k(self, k: int) -> None:
        """Run ``k`` experts per token (a client's ``K_c``), ``1 <= k <= k_max``."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.k_max:
            raise ValueError(f"k={k!r} must be an integer in [1, k_max={self.k_max}]")
        self.k = k

    # ----------------------------------------------------------------- routing
    def _valid(self, num_tokens: int) -> torch.Tensor | None:
        """The real tokens ``[N]`` (``None``: all). Not checked for all-true: that would wait for the device."""
        if self.token_mask is None:
            return None
        valid = self.token_mask.reshape(-1).bool()
        if valid.shape[0] != num_tokens:
            raise ValueError(
                f"token_mask has {valid.shape[0]} entries for {num_tokens} tokens (set token_mask = None for "
                "generation, or to this batch's [batch, length] mask)"
            )
        return valid

    def num_candidates(self) -> int:
        """DMR's ``|T(x)|`` at the current K: ``max(K_c, N_p)`` capped at E (the encoders' rule)."""
        options = self.options
        return num_candidates(self.k, self.num_experts, options.np_ratio, options.num_candidates)

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
            # DMR (smoe/routing.modulate, with the candidate mask computed once): kappa * phi on T(x) only
            shift = self.options.kappa * self.phi.to(logits.dtype)
            n_candidates = self.num_candidates()
            if n_candidates < e:
                candidates = candidate_mask(logits, n_candidates)
                logits = logits + shift * candidates.to(logits.dtype)
            else:
                logits = logits + shift
        probs = torch.softmax(logits, dim=-1)
        # the active set is the top K among the candidates T(x) (docs/paper.md): a
        # negative phi can push a candidate down but never let a non-candidate in
        selection = probs.detach() if candidates is None else probs.detach().masked_fill(~candidates, -1.0)
        experts = selection.topk(k, dim=-1).indices
        top = probs.gather(-1, experts)
        if self.renormalize:
            top = top / top.sum(dim=-1, keepdim=True)
        active = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, experts, True)
        return Routing(logits=logits, probs=probs, experts=experts, active=active), top.to(x.dtype)

    def sort_assignments(
        self, experts: torch.Tensor, gates: torch.Tensor, valid: torch.Tensor | None
    ) -> SortedAssignments:
        """Sort the (token, expert) assignments by expert (stable: tokens ascending), padding's last."""
        return sort_assignments(experts, gates, valid, self.num_experts)

    # ----------------------------------------------------------------- experts
    def run_experts(
        self,
        x: torch.Tensor,
        plan: SortedAssignments,
        want_sums: bool,
        missed: MissedTokenArgs | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``sum_e g_e E_e(x)`` over the plan's assignments ``[N, h]``; per-expert sums of the hidden units.

        Computed in the expert stacks' dtype (the adapters and gates are cast to it), returned in
        ``x``'s. ``missed``: the PG expert signal's sink, filled by the backward pass.
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
        kernel = products_class(self.expert_kernel, x, gate_up, down, *(t for t in lora if t is not None))
        y, sums = SwiGLUExperts.apply(
            x.to(dtype), plan.gates.to(dtype), *lora, plan, gate_up.detach(), down.detach(), scaling, self.activation,
            want_sums, kernel(plan), missed,
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
            ys = torch.cat(outputs)
            real = ys.shape[0]  # the padding assignments sit behind the segments
            y = y.index_add(0, plan.tokens[:real], ys * plan.gates[:real, None])
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
        inactive = ~routing.active if valid is None else (~routing.active) & valid[:, None]
        missed = None
        if training and self.options.pg_expert_sink and self.lora is not None and self.k < self.num_experts:
            # the backward pass (of the recomputed graph under checkpointing: it runs once) fills the sink
            if self.pg_sink is None:
                self.pg_sink = MissedTokenSink()
            missed = MissedTokenArgs(self.pg_sink, probs.detach() * inactive.to(probs.dtype))
        y, sums = self.run_experts(x, plan, want_sums, missed)
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
            self.aux_loss = switch_balance_loss(probs, plan.counts, self.k, valid)
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
        n = probs.shape[0] if valid is None else valid.sum()  # a device tensor: no wait for the host
        self._add_counts(counts, (probs.detach().double() * inactive).sum(0), n, training)  # summed in float64

    def reset_step(self) -> None:
        self.step_counters.zero_()
        self.pg_sink = None
