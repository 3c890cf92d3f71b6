"""Client side of a federated round: who a client is (tier, K_c or rank) and its local training.

A client loads the state the server sent into the one shared module, trains a fresh
optimizer for the configured local budget on its own data, and returns a
:class:`ClientUpdate`: the new trainable state plus the statistics the server needs
(example count, per-layer expert and token counts, PG default outputs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from ubsmoe.settings import Tier
from ubsmoe.fl.devices import module_device, move_tensors
from ubsmoe.fl.faults import FaultInjection, InjectedFailure, NonFiniteLoss, inject_bad_shape, inject_nonfinite
from ubsmoe.fl.faults import poison_update
from ubsmoe.fl.schedule import lr_factor
from ubsmoe.seeding import derive_seed

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from ubsmoe.data.datamodule import ClientDataModule
    from ubsmoe.model import FederatedModel

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientSpec:
    """A client's identity and compute shape: K_c active experts (sparse) or LoRA rank r_c."""

    client_id: int
    tier: Tier
    tier_index: int
    k: int | None
    rank: int | None


@dataclass
class ClientPayload:
    """What the server sends one client.

    ``state``: the trainable tensors, shaped for the client (e.g. rank-truncated);
    ``pg_defaults``: UB-SMoE's default expert outputs D per layer; ``base_deltas``: dense
    updates merged into frozen weights (FLoRA), keyed ``<adapted module>.base_delta``.
    """

    state: Tensors
    pg_defaults: Tensors = field(default_factory=dict)
    base_deltas: Tensors = field(default_factory=dict)

    def num_bytes(self) -> int:
        return tensor_bytes(self.state) + tensor_bytes(self.pg_defaults) + tensor_bytes(self.base_deltas)

    def same_as(self, other: ClientPayload) -> bool:
        """Whether ``other`` carries exactly the same tensors (names, shapes, dtypes, values)."""

        def same(a: Tensors, b: Tensors) -> bool:
            return a.keys() == b.keys() and all(
                a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
            )

        return (
            same(self.state, other.state)
            and same(self.pg_defaults, other.pg_defaults)
            and same(self.base_deltas, other.base_deltas)
        )

    def to(self, device: torch.device | str) -> ClientPayload:
        """The payload with every tensor on ``device`` (where the client loads it)."""
        return replace(
            self,
            state=move_tensors(self.state, device),
            pg_defaults=move_tensors(self.pg_defaults, device),
            base_deltas=move_tensors(self.base_deltas, device),
        )


@dataclass
class ClientUpdate:
    """What a client sends back after local training."""

    spec: ClientSpec
    state: Tensors
    num_examples: int
    telemetry: dict[str, Tensors]
    pg_defaults: Tensors
    train_loss: float
    num_steps: int
    bytes_received: int = 0  # server -> client (set by the loop through the strategy's accounting)
    bytes_sent: int = 0  # client -> server
    simulated_delay: float = 0.0  # seconds a (simulated) straggler declares on top of its real time
    train_seconds: float = 0.0  # wall time of the local steps alone (no payload loading, no delay)
    peak_memory_bytes: int | None = None  # CUDA: peak allocated memory during the local steps; else None

    def to(self, device: torch.device | str) -> ClientUpdate:
        """The update with every tensor it carries (state, PG defaults, telemetry) detached and on ``device``.

        The loop calls it once where a reply is received (:mod:`ubsmoe.fl.devices`).
        """
        return replace(
            self,
            state=move_tensors(self.state, device),
            pg_defaults=move_tensors(self.pg_defaults, device),
            telemetry=move_tensors(self.telemetry, device),
        )

    def expert_tokens(self, layer: str) -> torch.Tensor:
        return self.telemetry[layer]["expert_tokens"]

    def tokens(self, layer: str) -> float:
        return float(self.telemetry[layer]["tokens"])


def tensor_bytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def assign_tiers(num_clients: int, tiers: list[Tier]) -> list[int]:
    """Tier index of every client: counts by largest remainder of share * num_clients, in order.

    The partitioner's draws are exchangeable across clients, so contiguous blocks are as
    random as a shuffle and easier to read in reports.
    """
    raw = [t.share * num_clients for t in tiers]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(tiers)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: num_clients - sum(counts)]:
        counts[i] += 1
    return [i for i, c in enumerate(counts) for _ in range(c)]


def make_tier_specs(
    tiers: list[Tier],
    *,
    sparse: bool,
    hetero_rank: bool,
    num_experts: int,
    max_rank: int,
    k_max: int | None = None,
    homogeneous_rank: str = "full",
) -> list[ClientSpec]:
    """The compute shape of every tier (client_id -1): sparse methods scale K, rank methods scale r.

    ``K_c = max(1, floor(K_max * beta))`` with ``k_max`` (None: ``num_experts``, the dense-cut
    default where the full-budget tier runs every expert). Methods with one rank for all
    (FedIT) train rank ``r`` in every tier (``homogeneous_rank="full"``, an upper bound) or
    the smallest tier's ``r_c`` (``"smallest"``, what every client can afford).
    """
    k_max = num_experts if k_max is None else k_max
    if not 1 <= k_max <= num_experts:
        raise ValueError(f"k_max={k_max} must lie in [1, {num_experts}]")
    if hetero_rank:
        ranks = [tier.lora_rank(max_rank) for tier in tiers]
    elif homogeneous_rank == "smallest":
        ranks = [min(tier.lora_rank(max_rank) for tier in tiers)] * len(tiers)
    elif homogeneous_rank == "full":
        ranks = [None] * len(tiers)
    else:
        raise ValueError(f"homogeneous_rank={homogeneous_rank!r} must be 'full' or 'smallest'")
    return [
        ClientSpec(
            client_id=-1,
            tier=tier,
            tier_index=t_idx,
            k=tier.num_experts_active(k_max) if sparse else None,
            rank=rank,
        )
        for t_idx, (tier, rank) in enumerate(zip(tiers, ranks, strict=True))
    ]


def make_client_specs(num_clients: int, tier_specs: list[ClientSpec]) -> list[ClientSpec]:
    """One :class:`ClientSpec` per client, its tier from :func:`assign_tiers`."""
    tiers = [s.tier for s in tier_specs]
    return [replace(tier_specs[t], client_id=cid) for cid, t in enumerate(assign_tiers(num_clients, tiers))]


def train_client(
    fabric: Fabric,
    module: FederatedModel,
    spec: ClientSpec,
    payload: ClientPayload,
    data: ClientDataModule,
    *,
    round_idx: int,
    local_steps: int | None,
    local_epochs: int | None,
    seed: int,
    regularizer: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    faults: FaultInjection | None = None,
    total_rounds: int | None = None,
    prox_mu: float = 0.0,
) -> ClientUpdate:
    """Local training of one client on the shared module; returns its update.

    ``regularizer`` is a method's client-side loss term (HetLoRA's self-pruning penalty).
    ``faults`` injects this client's seeded fault of the round, if any (:mod:`ubsmoe.fl.faults`).
    A non-finite loss stops training with :class:`~ubsmoe.fl.faults.NonFiniteLoss`: the
    client reports the failure instead of sending garbage.

    The module's ``optim_settings`` give the rates, scaled by the round's schedule factor
    (``total_rounds`` is needed by the cosine schedule), and the gradient clipping;
    ``prox_mu`` > 0 adds FedProx's proximal term (:func:`proximal_term`) to the loss.
    """
    fault = faults.draw(seed, round_idx, spec.client_id) if faults is not None else None
    load_payload(module, spec, payload)
    module.reset_telemetry()
    module.train()
    # Dropout and any other in-step randomness depend only on (seed, round, client), so a
    # resumed run, or the same client trained in another order, draws the same numbers.
    torch.manual_seed(derive_seed(seed, "train", round_idx, spec.client_id))
    settings = module.optim_settings
    optimizer = fabric.setup_optimizers(module.configure_optimizers(lr_factor(settings, round_idx, total_rounds)))
    anchor = received_state(module) if prox_mu > 0 else None
    total_loss, steps = 0.0, 0
    memory = PeakMemory(module_device(module))
    started = time.perf_counter()
    for step, batch in enumerate(data.batches(round_idx, num_steps=local_steps, num_epochs=local_epochs)):
        batch = fabric.to_device(batch)
        optimizer.zero_grad(set_to_none=True)
        with fabric.autocast():
            loss = module.training_step(batch, step)
            if regularizer is not None:
                loss = loss + regularizer(module)
            if anchor is not None:
                loss = loss + proximal_term(module, anchor, prox_mu)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(f"client {spec.client_id}: local loss {value} at step {step}; training stopped")
        fabric.backward(loss)
        module.on_after_backward()  # PG's additions first: the clipping bounds the gradient really applied
        if settings.grad_clip is not None:
            fabric.clip_gradients(module, optimizer, max_norm=float(settings.grad_clip), error_if_nonfinite=False)
        optimizer.step()
        total_loss += value
        steps += 1
        if fault == "fail":
            raise InjectedFailure(f"client {spec.client_id}: injected failure after local step {step}")
    train_seconds = memory.synchronized(time.perf_counter) - started
    state = module.trainable_state()
    pg_defaults = module.pg_defaults()
    update = ClientUpdate(
        spec=spec,
        state=state,
        num_examples=data.num_examples,
        telemetry=module.telemetry(),
        pg_defaults=pg_defaults,
        train_loss=total_loss / max(steps, 1),
        num_steps=steps,
        train_seconds=train_seconds,
        peak_memory_bytes=memory.peak(),
    )
    if fault is not None and faults is not None:
        rng = faults.detail_rng(seed, round_idx, spec.client_id)
        if fault == "nonfinite":
            inject_nonfinite(update.state, rng)
        elif fault == "bad_shape":
            inject_bad_shape(update.state, rng)
        elif fault == "straggler":
            update.simulated_delay = faults.straggler_delay
        elif fault == "byzantine":  # a poisoned client: its change scaled, flipped or replaced by noise
            poison_update(update.state, payload.state, faults.byzantine_mode, faults.byzantine_scale, rng)
            poison_update(update.pg_defaults, payload.pg_defaults, faults.byzantine_mode, faults.byzantine_scale, rng)
    return update


class PeakMemory:
    """The peak CUDA memory allocated on ``device`` from now on (None on any other device).

    Starting resets the device's peak statistics, so the peak is this client's: on a
    shared module it includes the resident backbone, the same for every client, plus what
    the client's own training (activations at its K_c or rank, gradients, optimizer
    state) adds on top.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None
        if self.device is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def synchronized(self, clock: Callable[[], float]) -> float:
        """``clock()`` once the device's queued work is done (the time really spent, not the time queued)."""
        if self.device is not None:
            torch.cuda.synchronize(self.device)
        return clock()

    def peak(self) -> int | None:
        return None if self.device is None else int(torch.cuda.max_memory_allocated(self.device))


def received_state(module: torch.nn.Module) -> Tensors:
    """The trainable tensors as loaded from the payload (detached copies, on the module's device).

    Read from the module right after :func:`load_payload`, so a rank-truncated payload is
    the anchor exactly as the client trains it (components beyond r_c zero in both).
    """
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def proximal_term(module: torch.nn.Module, anchor: Tensors, mu: float) -> torch.Tensor:
    """FedProx (Li et al., 2020): mu / 2 * sum over trainable tensors of ||theta - theta_global||^2."""
    params = dict(module.named_parameters())
    total = sum(((params[n] - a) ** 2).sum() for n, a in anchor.items())
    return 0.5 * mu * total


def load_payload(module: FederatedModel, spec: ClientSpec, payload: ClientPayload) -> None:
    """Put a client's compute shape and the server's payload into the shared module.

    The payload arrives on the server's device; it is moved here, once, to the module's.
    """
    payload = payload.to(module_device(module))
    module.set_client(k=spec.k, rank=spec.rank, tier_index=spec.tier_index)
    module.set_base_deltas(payload.base_deltas)
    module.load_trainable_state(payload.state)
    module.set_pg_defaults(payload.pg_defaults)
