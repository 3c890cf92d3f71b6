"""Every client reply is untrusted: check it against what the server sent before aggregating it.

A reply is usable only if its trainable state has exactly the tensors of the payload the
client received (same names, shapes and dtypes: for the rank baselines that is the
truncated, zero-padded payload, not the global state), every value is finite, its PG
defaults and telemetry are well formed and finite, its example count is positive, and,
with ``federation.max_update_norm``, the L2 norm of its change over everything it was sent
stays under that cap. :func:`screen_results` turns a round's backend results into the
updates to aggregate and the :class:`~ubsmoe.fl.faults.DroppedClient` records of the rest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ubsmoe.fl.backends.base import ClientJob, ClientResult
from ubsmoe.fl.client import ClientPayload, ClientUpdate
from ubsmoe.fl.faults import DroppedClient


@dataclass(frozen=True)
class Rejection:
    """Why a reply was dropped: a short kind (for counting) and a sentence (for people)."""

    kind: str
    reason: str


def check_tensors(label: str, got: Mapping[str, object], sent: Mapping[str, torch.Tensor]) -> Rejection | None:
    """Same names, shapes and dtypes as ``sent``, and all values finite."""
    missing = sorted(set(sent) - set(got))
    if missing:
        return Rejection("missing", f"{label}: {len(missing)} tensor(s) missing, e.g. {missing[0]}")
    extra = sorted(set(got) - set(sent))
    if extra:
        return Rejection("unexpected", f"{label}: {len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    for name in sorted(sent):
        value, ref = got[name], sent[name]
        if not isinstance(value, torch.Tensor):
            return Rejection("invalid", f"{label}: {name} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(ref.shape):
            return Rejection("shape", f"{label}: {name} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if value.dtype != ref.dtype:
            return Rejection("dtype", f"{label}: {name} has dtype {value.dtype}, expected {ref.dtype}")
        if value.is_floating_point() or value.is_complex():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                return Rejection("nonfinite", f"{label}: {name} has {bad} non-finite value(s)")
    return None


def update_norm(update: ClientUpdate, payload: ClientPayload) -> float:
    """L2 norm (float64) of the change of every floating tensor the client was sent."""
    total = 0.0
    for name, ref in payload.state.items():
        if ref.is_floating_point():
            total += float((update.state[name].to(torch.float64) - ref.to(torch.float64)).pow(2).sum())
    return math.sqrt(total)


def validate_update(update: object, payload: ClientPayload, *, max_update_norm: float | None = None) -> Rejection | None:
    """None if ``update`` may be aggregated, else the first reason it may not."""
    if not isinstance(update, ClientUpdate):
        return Rejection("invalid", f"the reply is a {type(update).__name__}, not a ClientUpdate")
    if not isinstance(update.state, Mapping):
        return Rejection("invalid", "the trainable state is not a mapping of tensors")
    rejection = check_tensors("state", update.state, payload.state)
    if rejection is None and payload.pg_defaults:
        if not isinstance(update.pg_defaults, Mapping):
            return Rejection("invalid", "the PG defaults are not a mapping of tensors")
        rejection = check_tensors("pg_defaults", update.pg_defaults, payload.pg_defaults)
    if rejection is not None:
        return rejection
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return Rejection("invalid", f"num_examples={n!r} is not a positive integer")
    if not math.isfinite(float(update.train_loss)):
        return Rejection("nonfinite", f"train_loss={update.train_loss} is not finite")
    for layer, counters in update.telemetry.items():
        for key, value in counters.items():
            t = torch.as_tensor(value)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return Rejection("nonfinite", f"telemetry {layer}.{key} has non-finite values")
            if bool((t < 0).any()):
                return Rejection("invalid", f"telemetry {layer}.{key} has negative values")
    if max_update_norm is not None:
        norm = update_norm(update, payload)
        if norm > max_update_norm:
            return Rejection("norm", f"update norm {norm:.4g} exceeds federation.max_update_norm={max_update_norm:g}")
    return None


def error_kind(error: str) -> str:
    """The kind of a backend-reported failure: ``timeout`` or ``error``."""
    return "timeout" if "timeout" in error.lower().split(":", 1)[0] or error.lower().startswith("timed out") else "error"


def screen_results(
    jobs: list[ClientJob],
    results: list[ClientResult],
    *,
    round_number: int,
    max_update_norm: float | None = None,
) -> tuple[list[ClientUpdate], list[DroppedClient]]:
    """The updates to aggregate (sorted by client id) and a record for every job without a usable one."""
    by_id = {r.client_id: r for r in results}
    good: list[ClientUpdate] = []
    dropped: list[DroppedClient] = []
    for job in sorted(jobs, key=lambda j: j.client_id):
        result = by_id.get(job.client_id)
        if result is None:
            rejection: Rejection | None = Rejection("error", "no reply came back")
        elif not result.ok:
            error = result.error or "no update"
            rejection = Rejection(error_kind(error), error)
        else:
            rejection = validate_update(result.update, job.payload, max_update_norm=max_update_norm)
            claimed = getattr(getattr(result.update, "spec", None), "client_id", None)
            if rejection is None and claimed != job.client_id:
                rejection = Rejection("invalid", f"the reply claims to come from client {claimed}")
        if rejection is None:
            assert result is not None and result.update is not None
            # the server's own record of whom it asked, with which tier, K and rank, is what counts
            result.update.spec = job.spec
            good.append(result.update)
        else:
            dropped.append(
                DroppedClient(round_number, job.client_id, job.spec.tier.name, rejection.kind, rejection.reason)
            )
    return good, dropped
