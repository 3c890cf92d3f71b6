"""The clients' learning rate over rounds: one factor per round that scales every group's rate.

Federated clients build a fresh optimizer every round, so a schedule in the usual
per-step sense would restart each round. What researchers vary instead is the local rate
*across rounds*: every client of round ``r`` trains at ``factor(r) * lr`` (and the same
factor on ``head_lr``, ``router_lr``, ``phi_lr``). With ``r`` the 0-based round index,
``R`` the total number of rounds and ``W = optim.warmup_rounds``:

- warm-up, ``r < W``: ``(r + 1) / (W + 1)`` (linear; no round trains at rate 0 and the
  first round after warm-up is the first at the full rate);
- after warm-up, with ``t = r - W`` and ``T = max(R - W, 1)`` the rounds left:

  - ``constant``: 1;
  - ``cosine``: ``m + (1 - m) * (1 + cos(pi * t / T)) / 2`` with ``m = optim.min_lr_factor``
    (round ``W`` at the full rate; the last round just above ``m``, never at it);
  - ``step``: ``optim.step_gamma ** (t // optim.step_rounds)``.

Only ``cosine`` depends on ``R``; the runner therefore refuses to resume a cosine run with
another ``federation.rounds`` (the rates of the remaining rounds would change).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ubsmoe.settings import OptimSettings

# (t = rounds since warm-up ended, T = rounds after warm-up, settings) -> factor
ScheduleFn = Callable[[int, int, OptimSettings], float]


def _constant(t: int, span: int, settings: OptimSettings) -> float:
    return 1.0


def _cosine(t: int, span: int, settings: OptimSettings) -> float:
    low = float(settings.min_lr_factor)
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * t / span))


def _step(t: int, span: int, settings: OptimSettings) -> float:
    return float(settings.step_gamma) ** (t // int(settings.step_rounds))


SCHEDULES: dict[str, ScheduleFn] = {"constant": _constant, "cosine": _cosine, "step": _step}
# Schedules whose rates depend on the total number of rounds.
NEEDS_TOTAL_ROUNDS = frozenset({"cosine"})


def lr_factor(settings: OptimSettings, round_idx: int, total_rounds: int | None) -> float:
    """The factor on every client learning rate in round ``round_idx`` (0-based) of ``total_rounds``."""
    if round_idx < 0:
        raise ValueError(f"round_idx={round_idx} must be >= 0")
    schedule = SCHEDULES.get(settings.schedule)
    if schedule is None:
        raise ValueError(f"unknown schedule {settings.schedule!r}: one of {sorted(SCHEDULES)}")
    warmup = int(settings.warmup_rounds)
    if round_idx < warmup:
        return (round_idx + 1) / (warmup + 1)
    if total_rounds is None and settings.schedule in NEEDS_TOTAL_ROUNDS:
        raise ValueError(f"the {settings.schedule} schedule needs the total number of rounds")
    span = max(int(total_rounds or 0) - warmup, 1)
    return schedule(round_idx - warmup, span, settings)
