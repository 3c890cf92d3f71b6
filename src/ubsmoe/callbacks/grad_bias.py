"""The convergence bound's bias term, measured: sparse expert gradient against all-experts gradient.

The paper's bound has an error floor from the bias between the expert-LoRA gradient a
client with ``K_c < M`` experts computes and the gradient it would get with every expert
active, which grows with ``M - K_c``; PG's expert signal is argued to shrink it. Every
``diagnostics.every`` rounds this callback takes the global model as each tier receives it,
a fixed probe batch of that tier's clients' training data, and computes

    grad_bias    = ||g_K - g_M|| / ||g_M||          (the tier's routing, without PG's expert signal)
    grad_bias_pg = ||g_K + PG - g_M|| / ||g_M||     (plus PG's expert pseudo-gradients)

over all expert-LoRA tensors (flattened), where ``g_M`` is the gradient at ``K = M``. Both
passes use the same dropout masks (the RNG is reseeded), so at ``K = M`` the bias is 0
exactly. The values land in ``metrics.jsonl`` (fields ``grad_bias``, ``grad_bias_pg``, null
on rounds without a measurement and for dense methods) through ``RoundSummary.tier_extras``,
so this callback must run before the metrics writer.
"""

from __future__ import annotations

from typing import Any

import torch

from ubsmoe.data.calibration import calibration_batches
from ubsmoe.fl.client import load_payload
from ubsmoe.smoe.pseudo_grad import add_expert_pseudo_gradients, pseudo_gradient_coefficients

PROBE_SEED = 12345


def _flat_expert_grads(module: Any) -> torch.Tensor:
    params = dict(module.named_parameters())
    grads = []
    for name in module.expert_tensor_names():
        grad = params[name].grad
        grads.append(torch.zeros_like(params[name]).flatten() if grad is None else grad.detach().flatten())
    return torch.cat(grads).double()


def _add_pseudo_gradients(module: Any) -> None:
    """PG's expert signal from this pass's routing statistics (whatever the method's own switch says)."""
    eta = module.method.pg.eta
    for block in module.blocks.values():
        if block.lora is not None and block.k < block.num_experts:
            c = block.counters("step")
            coefficients = pseudo_gradient_coefficients(
                c["tokens"], c["inactive_mass"], c["active_mass"], c["active_assignments"], block.k, eta
            )
            add_expert_pseudo_gradients(block.lora.tensors(), c["expert_tokens"], coefficients)


def expert_gradient(module: Any, batch: dict[str, torch.Tensor], k: int, *, pg: bool, seed: int) -> torch.Tensor:
    """The flat expert-LoRA gradient of the task loss on ``batch`` with ``k`` experts (plus PG when asked)."""
    module.set_client(k=k, rank=module.rank_limiter.rank, tier_index=module.tier_index)
    module.train()
    module.zero_grad(set_to_none=True)
    for block in module.blocks.values():
        block.reset_step()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # same dropout masks in every pass
        with torch.enable_grad():
            logits = module(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            module.task_loss(logits, batch["labels"]).backward()
    if pg:
        _add_pseudo_gradients(module)
    grad = _flat_expert_grads(module)
    module.zero_grad(set_to_none=True)
    for block in module.blocks.values():
        block.reset_step()
    module.reset_telemetry()
    return grad


def gradient_bias(module: Any, batch: dict[str, torch.Tensor], k: int, *, seed: int = PROBE_SEED) -> dict[str, float]:
    """``{"grad_bias", "grad_bias_pg"}`` at ``k`` experts on ``batch``, relative to all experts.

    A training forward pass updates the PG default outputs (a running mean), and through
    the router signal they reach the gradient of earlier layers; every pass therefore starts
    from the same defaults, and the module gets its own back at the end.
    """
    defaults = module.pg_defaults()

    def grad(kk: int, pg: bool) -> torch.Tensor:
        module.set_pg_defaults(defaults)
        return expert_gradient(module, batch, kk, pg=pg, seed=seed)

    try:
        reference = grad(module.model_settings.num_experts, False)
        norm = max(float(reference.norm()), 1e-30)
        return {key: float((grad(k, pg) - reference).norm()) / norm
                for key, pg in (("grad_bias", False), ("grad_bias_pg", True))}  # fmt: skip
    finally:
        module.set_pg_defaults(defaults)


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
                batches = calibration_batches(clients, self.probe_examples, batch_size=self.probe_examples)
                self.probes[tier_index] = self._with_labels(clients, self.probe_examples) | batches[0]

    @staticmethod
    def _with_labels(clients: list[Any], n: int) -> dict[str, torch.Tensor]:
        """The labels of the same examples :func:`calibration_batches` picks (round robin over clients)."""
        labels, position = [], 0
        while len(labels) < n:
            added = False
            for client in clients:
                if position < len(client.dataset) and len(labels) < n:
                    labels.append(client.dataset[position]["labels"])
                    added = True
            if not added:
                break
            position += 1
        return {"labels": torch.as_tensor(labels)}

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
