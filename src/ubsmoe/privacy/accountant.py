"""Epsilon of client-level DP-FedAvg, from Google's ``dp-accounting`` RDP accountant (never by hand).

Each round with a release is one sampled Gaussian mechanism: noise multiplier z (noise std
over the clipped update's sensitivity) and client sampling rate q = clients_per_round /
num_clients. The accountant treats the sampling as Poisson with rate q (each client joins a
round independently), the assumption of McMahan et al. (2018). The federation samples a
fixed number of clients without replacement (:class:`ubsmoe.fl.server.ClientSampler`), so the
reported epsilon is the Poisson approximation of that scheme, not a bound proven for it;
docs/privacy.md says so next to every number.

The accountant's state is the list of (q, z, rounds) it composed: it goes into the checkpoint
and a resumed run composes the same events again, so it reports the same epsilon as a run
that was never interrupted.
"""

from __future__ import annotations

from typing import Any

import dp_accounting
from dp_accounting import dp_event, rdp

# Integer Renyi orders (fractional ones make dp-accounting warn for large q) and a few large ones.
RDP_ORDERS: tuple[float, ...] = (*(float(a) for a in range(2, 129)), 192.0, 256.0, 512.0, 1024.0)


def round_event(sampling_rate: float, noise_multiplier: float) -> dp_event.DpEvent:
    """One round: the Gaussian mechanism on a Poisson sample of clients with rate q."""
    return dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier))


def fresh_accountant() -> rdp.RdpAccountant:
    return rdp.RdpAccountant(orders=list(RDP_ORDERS))


def epsilon_after(sampling_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` rounds with the same q and z (inf without noise)."""
    if rounds == 0:
        return 0.0
    accountant = fresh_accountant()
    accountant.compose(round_event(sampling_rate, noise_multiplier), rounds)
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(sampling_rate: float, rounds: int, target_epsilon: float, delta: float) -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is at most ``target_epsilon``."""
    return float(
        dp_accounting.calibrate_dp_mechanism(
            fresh_accountant,
            lambda z: dp_event.SelfComposedDpEvent(round_event(sampling_rate, z), rounds),
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        )
    )


class PrivacyLedger:
    """The rounds released so far, composed in an RDP accountant; epsilon at the run's delta."""

    def __init__(self, delta: float) -> None:
        self.delta = float(delta)
        self.events: list[list[float]] = []  # [q, z, rounds], consecutive equal (q, z) merged
        self._accountant = fresh_accountant()

    def record_round(self, sampling_rate: float, noise_multiplier: float) -> None:
        """Compose one released round."""
        q, z = float(sampling_rate), float(noise_multiplier)
        if self.events and self.events[-1][:2] == [q, z]:
            self.events[-1][2] += 1
        else:
            self.events.append([q, z, 1])
        self._accountant.compose(round_event(q, z), 1)

    @property
    def rounds(self) -> int:
        return int(sum(count for _, _, count in self.events))

    def epsilon(self) -> float:
        """Epsilon at ``delta`` of everything released so far (0 before the first round)."""
        if not self.events:
            return 0.0
        return float(self._accountant.get_epsilon(self.delta))

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "events": [list(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta = float(state["delta"])
        self.events = []
        self._accountant = fresh_accountant()
        for q, z, count in state["events"]:
            self.events.append([float(q), float(z), int(count)])
            self._accountant.compose(round_event(float(q), float(z)), int(count))
