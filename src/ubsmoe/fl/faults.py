"""Injected client faults, seeded and reproducible, and the run's fault policy.

``federation.faults.{fail, nonfinite, bad_shape, straggler}`` are per-(round, client)
probabilities of four mutually exclusive faults. Whether a sampled client misbehaves,
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
  the outcome is reproducible; the Flower backend applies the real timeout).

The server side (what is dropped and why) lives in :mod:`ubsmoe.fl.validation`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ubsmoe.seeding import derive_seed

FAULT_KINDS = ("fail", "nonfinite", "bad_shape", "straggler")

Tensors = dict[str, torch.Tensor]


class InjectedFailure(RuntimeError):
    """The ``fail`` fault: a client that crashes during local training."""


class NonFiniteLoss(FloatingPointError):
    """A client's local loss became NaN or infinite; it stops and reports instead of sending garbage."""


@dataclass(frozen=True)
class FaultInjection:
    """Probabilities (per sampled client and round) of the four injected faults; they sum to at most 1."""

    fail: float = 0.0
    nonfinite: float = 0.0
    bad_shape: float = 0.0
    straggler: float = 0.0
    straggler_delay: float = 600.0  # seconds a straggler declares (local backend: simulated, no sleeping)

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


@dataclass(frozen=True)
class DroppedClient:
    """One reply the server did not aggregate: who, which tier, what kind of fault, and why."""

    round: int  # 1-based, as in metrics.jsonl
    client: int
    tier: str
    kind: str  # error | timeout | missing | unexpected | shape | dtype | nonfinite | norm | invalid
    reason: str

    def record(self) -> dict[str, Any]:
        return {"round": self.round, "client": self.client, "tier": self.tier, "kind": self.kind, "reason": self.reason}


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
