"""Injected client faults, seeded and reproducible, and the run's fault policy.

``federation.faults.{fail, nonfinite, bad_shape, straggler, byzantine}`` are per-(round,
client) probabilities of five mutually exclusive faults. Whether a sampled client misbehaves,
and how, is drawn from a generator seeded by ``(seed, round, client)`` alone, so it does
not depend on the order the clients run in, on which other clients were sampled, or on a
resume; a test can recompute exactly which (round, client) pairs were hit
(:meth:`FaultInjection.draw`).

The faults act inside :func:`~ubsmoe.fl.client.train_client`, where a real client would
misbehave:

- ``fail``: raises :class:`InjectedFailure` after the first local step;
- ``nonfinite``: returns one trainable tensor with NaN or +/-Inf entries;
- ``bad_shape``: returns one trainable tensor with a wrong shape, or leaves it out;
- ``straggler``: trains normally but declares ``straggler_delay`` seconds of (simulated)
  extra wall time; with ``federation.round_timeout`` set below it, the backend drops the
  reply as timed out (the local backend compares the declared delay with the timeout, so
  the outcome is reproducible; the Flower backend applies the real timeout);
- ``byzantine``: a poisoned client. It trains normally, then sends a changed update
  (:func:`poison_update`, ``byzantine_mode`` with factor ``byzantine_scale``): ``scale``
  multiplies its change (state minus what it received) by the factor, ``sign_flip`` by minus
  the factor, ``noise`` replaces it by Gaussian noise of the factor times its norm. The reply
  is well-formed, so the server aggregates it (unless ``max_update_norm`` drops it); the
  loop logs it to ``faults.jsonl`` with kind ``byzantine`` (:func:`poisoned_records`).

The server side (what is dropped and why) lives in :mod:`ubsmoe.fl.validation`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ubsmoe import names
from ubsmoe.seeding import derive_seed

FAULT_KINDS = names.FAULT_KINDS

Tensors = dict[str, torch.Tensor]


class InjectedFailure(RuntimeError):
    """The ``fail`` fault: a client that crashes during local training."""


class NonFiniteLoss(FloatingPointError):
    """A client's local loss became NaN or infinite; it stops and reports instead of sending garbage."""


@dataclass(frozen=True)
class FaultInjection:
    """Probabilities (per sampled client and round) of the five injected faults; they sum to at most 1."""

    fail: float = 0.0
    nonfinite: float = 0.0
    bad_shape: float = 0.0
    straggler: float = 0.0
    byzantine: float = 0.0
    straggler_delay: float = 600.0  # seconds a straggler declares (local backend: simulated, no sleeping)
    byzantine_mode: str = "scale"  # scale | sign_flip | noise (names.BYZANTINE_MODES)
    byzantine_scale: float = 100.0  # the factor of the poisoned change

    @property
    def active(self) -> bool:
        return any(getattr(self, kind) > 0 for kind in FAULT_KINDS)

    def draw(self, seed: int, round_idx: int, client_id: int) -> str | None:
        """The fault of client ``client_id`` in round ``round_idx`` (0-based), or None; depends on nothing else."""
        if not self.active:
            return None
        u = random.Random(derive_seed(seed, "faults", round_idx, client_id)).random()
        cumulative = 0.0
        for kind in FAULT_KINDS:
            cumulative += getattr(self, kind)
            if u < cumulative:
                return kind
        return None

    @staticmethod
    def detail_rng(seed: int, round_idx: int, client_id: int) -> random.Random:
        """The generator that picks which tensor a fault corrupts (separate from :meth:`draw`)."""
        return random.Random(derive_seed(seed, "faults", "detail", round_idx, client_id))


@dataclass(frozen=True)
class FaultPolicy:
    """What the server tolerates: injected faults (tests, soak), minimum good replies, norm cap, timeout."""

    injection: FaultInjection = field(default_factory=FaultInjection)
    min_replies: int = 1
    max_update_norm: float | None = None
    round_timeout: float | None = None


def inject_nonfinite(state: Tensors, rng: random.Random) -> str:
    """Put a NaN or +/-Inf into one floating tensor of ``state`` (in place on a copy); return its name."""
    names = sorted(n for n, t in state.items() if t.is_floating_point() and t.numel() > 0)
    name = rng.choice(names)
    tensor = state[name].clone()
    flat = tensor.view(-1)
    flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    state[name] = tensor
    return name


def inject_bad_shape(state: Tensors, rng: random.Random) -> str:
    """Drop one tensor of ``state`` or change its shape (one more row, or flattened); return its name."""
    name = rng.choice(sorted(state))
    how = rng.choice(["missing", "extra_row", "flattened"])
    tensor = state[name]
    if how == "missing":
        del state[name]
    elif how == "extra_row" or tensor.dim() < 2:
        state[name] = torch.cat([tensor.reshape(-1), tensor.new_zeros(1)]) if tensor.dim() < 2 else torch.cat(
            [tensor, tensor.new_zeros((1, *tensor.shape[1:]))]
        )
    else:
        state[name] = tensor.reshape(-1)
    return name


def _scaled(change: torch.Tensor, factor: float, rng: torch.Generator) -> torch.Tensor:
    del rng
    return change * factor


def _sign_flipped(change: torch.Tensor, factor: float, rng: torch.Generator) -> torch.Tensor:
    del rng
    return change * -factor


def _noise(change: torch.Tensor, factor: float, rng: torch.Generator) -> torch.Tensor:
    """Gaussian noise whose expected squared norm is ``factor**2`` times the change's."""
    rms = change.pow(2).mean().sqrt() if change.numel() else change.new_zeros(())
    return torch.randn(change.shape, generator=rng, dtype=change.dtype) * rms * factor


POISONINGS = {"scale": _scaled, "sign_flip": _sign_flipped, "noise": _noise}
assert tuple(POISONINGS) == names.BYZANTINE_MODES, "ubsmoe.names.BYZANTINE_MODES and POISONINGS must match"


def poison_update(sent: Tensors, received: Tensors, mode: str, factor: float, rng: random.Random) -> None:
    """Replace each floating tensor of ``sent`` (in place) by received + poisoned(sent - received).

    A tensor without a received counterpart (none in the methods here) is left as it is.
    """
    poison = POISONINGS[mode]
    generator = torch.Generator().manual_seed(rng.randrange(2**63))
    for name in sorted(sent):
        tensor, base = sent[name], received.get(name)
        if base is None or not tensor.is_floating_point() or base.shape != tensor.shape:
            continue
        origin = base.detach().to(device="cpu", dtype=torch.float64)
        change = tensor.detach().to(device="cpu", dtype=torch.float64) - origin
        sent[name] = (origin + poison(change, factor, generator)).to(device=tensor.device, dtype=tensor.dtype)


@dataclass(frozen=True)
class DroppedClient:
    """One reply the server did not aggregate (kind ``byzantine``: aggregated though poisoned): who, tier, kind, why."""

    round: int  # 1-based, as in metrics.jsonl
    client: int
    tier: str
    kind: str  # error | timeout | missing | unexpected | shape | dtype | nonfinite | norm | invalid | byzantine
    reason: str

    def record(self) -> dict[str, Any]:
        return {"round": self.round, "client": self.client, "tier": self.tier, "kind": self.kind, "reason": self.reason}


def poisoned_records(
    injection: FaultInjection, seed: int, round_idx: int, accepted: list[tuple[int, str]]
) -> list[DroppedClient]:
    """Records for the accepted replies (client id, tier name) that were poisoned (``byzantine``) this round.

    The draw depends only on (seed, round, client), so the server side recomputes which
    replies were poisoned without the client saying so. They were aggregated, not dropped:
    the reason says so.
    """
    if injection.byzantine <= 0:
        return []
    return [
        DroppedClient(
            round=round_idx + 1,
            client=client,
            tier=tier,
            kind="byzantine",
            reason=f"aggregated a poisoned update ({injection.byzantine_mode} x{injection.byzantine_scale:g})",
        )
        for client, tier in accepted
        if injection.draw(seed, round_idx, client) == "byzantine"
    ]


class FaultLog:
    """``faults.jsonl`` in the run directory: one record per dropped client, kept in memory for resume.

    Like the metrics files, the records are checkpointed, and a resumed run rewrites the
    file up to its checkpoint before continuing, so it equals an uninterrupted run's.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / "faults.jsonl"
        self.records: list[dict[str, Any]] = []

    def rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    def add(self, dropped: list[DroppedClient]) -> None:
        if not dropped:
            return
        new = [d.record() for d in dropped]
        self.records.extend(new)
        with self.path.open("a") as f:
            for r in new:
                f.write(json.dumps(r) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"records": list(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = list(state.get("records", []))
