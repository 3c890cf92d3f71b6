"""The convergence bound's bias term, measured: sparse expert gradient against all-experts gradient.

The paper's bound has an error floor from the bias between the expert-LoRA gradient a
client with ``K_c < M`` experts computes and the gradient it would get with every expert
active, which grows with ``M - K_c``; PG's expert signal is argued to shrink it. Every
``diagnostics.every`` rounds this callback takes the global model as each tier receives it,
a fixed probe batch of that tier's clients' training data, and computes

    grad_bias    = ||g_K - g_M|| / ||g_M||               (the tier's routing, without PG's expert signal)
    grad_bias_pg = min_{a >= 0} ||g_K + a h - g_M|| / ||g_M||  (plus PG's direction h per expert, best scale)

over all expert-LoRA tensors (flattened). The reference ``g_M`` is the gradient with every
expert the model can run per token: K_max, the full-budget tier's K (``model.k_max``, else
the backbone's own top-k, else M). For a dense FFN cut into experts K_max = M by default,
the all-experts gradient; a native MoE decoder (OLMoE: 8 of 64) cannot run more than its
top-k, so there the bias is measured against its K_max experts, not against all E. Both
passes use the same dropout masks (the RNG is reseeded), so at ``K = K_max`` the bias is 0
exactly.

The router-side PG (``method.pg.router``, the project's addition) is switched off for the
measurement: its signal reaches the router and, through the router's input, the expert
LoRA of earlier layers, so with it on "without PG" would already contain PG gradients.
Both numbers therefore describe routing alone and the expert PG direction alone.

The probe is a fixed batch of the tier's clients' training data with its labels
(:func:`ubsmoe.data.calibration.probe_batch`), so the measurement runs on GLUE and on
instruction data alike. The values land in ``metrics.jsonl`` (fields ``grad_bias``, ``grad_bias_pg``, null
on rounds without a measurement and for dense methods) through ``RoundSummary.tier_extras``,
so this callback must run before the metrics writer.
"""

from __future__ import annotations

from typing import Any

import torch

from ubsmoe.data.calibration import probe_batch
from ubsmoe.fl.client import load_payload

PROBE_SEED = 12345


def _pg_directions(module: Any) -> dict[int, torch.Tensor]:
    """PG's expert direction per stacked LoRA tensor (``id(tensor) -> [M, ...]``) from this pass.

    ``missed_tokens`` (blocks that collect the sums): each expert's q-weighted mean gradient on
    the tokens it missed; ``shared_mean``: one per-assignment mean gradient for every expert.
    """
    out: dict[int, torch.Tensor] = {}
    for block in module.blocks.values():
        if block.lora is None or block.k >= block.num_experts:
            continue
        tensors = list(block.lora.tensors())
        sink = getattr(block, "pg_sink", None)
        if module.method.pg.expert_mode == "missed_tokens" and sink is not None:
            directions = sink.directions()
        else:
            total = float(block.counters("step")["expert_tokens"].to(torch.float64).sum())
            directions = [
                None if t.grad is None or total <= 0 else (t.grad.sum(0) / total).unsqueeze(0).expand_as(t.grad)
                for t in tensors
            ]
        for tensor, direction in zip(tensors, directions, strict=True):
            if direction is not None:
                out[id(tensor)] = direction.detach().double()
    return out


def expert_gradient(
    module: Any, batch: dict[str, torch.Tensor], k: int, *, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The expert-LoRA gradients of the task loss on ``batch`` with ``k`` experts, and PG's directions.

    Both as ``{tensor name: float64 tensor}`` (a direction only for tensors of blocks with
    ``k < M``). The PG switches of the method do not matter: the sums PG reads are collected
    whenever the block has a sink, and the shared form needs only the gradients.
    """
    module.set_client(k=k, rank=module.rank_limiter.rank, tier_index=module.tier_index)
    module.train()
    module.zero_grad(set_to_none=True)
    for block in module.blocks.values():
        block.reset_step()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # same dropout masks in every pass
        with torch.enable_grad():
            module.task.loss(module, batch).backward()
    params = dict(module.named_parameters())
    ids = {id(params[name]): name for name in module.expert_tensor_names()}
    grads = {}
    for name in module.expert_tensor_names():
        grad = params[name].grad
        grads[name] = torch.zeros_like(params[name], dtype=torch.float64) if grad is None else grad.detach().double()
    directions = {ids[key]: value for key, value in _pg_directions(module).items() if key in ids}
    module.zero_grad(set_to_none=True)
    for block in module.blocks.values():
        block.reset_step()
    module.reset_telemetry()
    return grads, directions


def _best_completion(missing: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``missing - a_i * direction_i`` per expert ``i`` (dim 0), ``a_i >= 0`` minimising its norm."""
    r = missing.reshape(missing.shape[0], -1)
    d = direction.reshape(direction.shape[0], -1)
    dd = (d * d).sum(1)
    alpha = torch.where(dd > 0, (r * d).sum(1) / dd.clamp_min(1e-300), torch.zeros_like(dd)).clamp_min(0.0)
    return r - alpha[:, None] * d


def gradient_bias(module: Any, batch: dict[str, torch.Tensor], k: int, *, seed: int = PROBE_SEED) -> dict[str, float]:
    """``{"grad_bias", "grad_bias_pg"}`` at ``k`` experts on ``batch``, relative to K_max experts.

    ``grad_bias = ||g_K - g_M|| / ||g_M||``, ``g_M`` at ``module.k_max`` (every expert of a
    dense FFN cut into experts; a native decoder's own top-k) and the router-side PG off in
    every pass (module docstring). ``grad_bias_pg`` is what is left when each
    expert's gradient is completed by PG's direction at its best non-negative scale (per
    expert and LoRA tensor): how much of what sparse routing drops PG's direction can
    supply, for any ``eta`` (the scale PG actually uses is ``eta * rho_c``, applied outside
    the optimizer, so no single gradient-unit value exists for it). The module gets its
    router-PG switch and its PG default outputs back at the end.
    """
    defaults = module.pg_defaults()
    router_pg = {name: block.options.pg_router for name, block in module.blocks.items()}
    try:
        for block in module.blocks.values():
            block.options.pg_router = False
        reference, _ = expert_gradient(module, batch, module.k_max, seed=seed)
        sparse, directions = expert_gradient(module, batch, k, seed=seed)
    finally:
        for name, block in module.blocks.items():
            block.options.pg_router = router_pg[name]
        module.set_pg_defaults(defaults)
    norm_sq = sum(float(g.square().sum()) for g in reference.values())
    plain_sq = completed_sq = 0.0
    for name, g_m in reference.items():
        missing = g_m - sparse[name]
        plain_sq += float(missing.square().sum())
        left = _best_completion(missing, directions[name]) if name in directions else missing
        completed_sq += float(left.square().sum())
    norm = max(norm_sq**0.5, 1e-30)
    return {"grad_bias": plain_sq**0.5 / norm, "grad_bias_pg": completed_sq**0.5 / norm}


class GradBiasCallback:
    """Every ``every`` rounds: :func:`gradient_bias` per tier on a fixed probe batch of its clients' data."""

    def __init__(self, every: int, probe_examples: int) -> None:
        self.every = int(every)
        self.probe_examples = int(probe_examples)
        self.probes: dict[int, dict[str, torch.Tensor]] = {}

    def on_fit_start(self, loop: Any) -> None:
        if not loop.module.sparse:
            return
        for tier_index in range(len(loop.tiers)):
            clients = [loop.data.clients[s.client_id] for s in loop.specs if s.tier_index == tier_index]
            if clients:
                self.probes[tier_index] = probe_batch(clients, self.probe_examples)

    def on_round_end(self, loop: Any, summary: Any) -> None:
        if not self.probes or summary.round % self.every:
            return
        module = loop.module
        for tier_index, tier in enumerate(loop.tiers):
            if tier_index not in self.probes:
                continue
            spec = loop.tier_spec(tier_index)
            load_payload(module, spec, loop.strategy.configure_client(loop.server, spec))
            batch = loop.fabric.to_device(self.probes[tier_index])
            summary.tier_extras.setdefault(tier.name, {}).update(gradient_bias(module, batch, spec.k))
