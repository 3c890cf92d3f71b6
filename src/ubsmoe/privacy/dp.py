"""DP-FedAvg's mechanism (McMahan et al., ICLR 2018) with optional adaptive clipping (Andrew et al., NeurIPS 2021).

Per round, on the server's side of the wire:

1. each client's update is one vector: every named part it sends (its trainable state minus
   the payload it received, its PG default outputs minus the ones it received, its expert
   utilization shares minus the uniform share; the caller names the parts) is scaled by
   ``min(1, C / ||v||)`` so that ``||v|| <= C`` over all parts together;
2. the strategy averages the clipped updates with equal weights (one client, one vote: a
   weight n_c would let one client's share of the average, hence the sensitivity, grow with
   its data);
3. Gaussian noise of std ``z * C / m`` is added to every averaged coordinate, m the number of
   averaged clients: the Gaussian mechanism with noise multiplier z on their sum.

With ``adaptive`` clipping, C follows the ``quantile`` gamma of the update norms: each
client also reports whether its norm was at most C; the server noises the count (std
sigma_b), and sets ``C <- C * exp(-lr * (b - gamma))`` with b the noisy unclipped fraction
(the geometric update of Andrew et al., Algorithm 1). The count release costs privacy too:
the update's noise multiplier becomes ``z_delta = (z**-2 - (2 sigma_b)**-2) ** -0.5`` so the
two releases together are one Gaussian mechanism with multiplier z, what the accountant
composes.

Everything here works on plain named tensors; which parts a method sends is the caller's
business (:mod:`ubsmoe.fl.aggregation`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ubsmoe.privacy.accountant import PrivacyLedger, noise_for_epsilon
from ubsmoe.settings import PrivacySettings

Tensors = dict[str, torch.Tensor]


def update_norm(parts: Tensors) -> float:
    """L2 norm of all parts together, as one flat vector (float64)."""
    total = sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in parts.values())
    return math.sqrt(total)


def clip_update(parts: Tensors, clip: float) -> tuple[Tensors, float]:
    """The parts scaled by ``min(1, clip / norm)`` (float64) and the norm before clipping."""
    norm = update_norm(parts)
    factor = 1.0 if norm <= clip else clip / norm
    return {name: t.detach().to(torch.float64) * factor for name, t in parts.items()}, norm


def update_noise_multiplier(noise_multiplier: float, count_noise: float | None) -> float:
    """z_delta of the clipped updates: z itself, or with adaptive clipping ``(z^-2 - (2 sigma_b)^-2)^-1/2``."""
    if count_noise is None or noise_multiplier == 0.0:
        return noise_multiplier
    rest = noise_multiplier**-2 - (2.0 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(f"count noise {count_noise} must exceed noise_multiplier / 2 = {noise_multiplier / 2}")
    return rest**-0.5


def resolved_count_noise(settings: PrivacySettings, clients_per_round: int) -> float | None:
    """sigma_b of the adaptive clipping's count: the setting, else clients_per_round / 20 (Andrew et al.)."""
    if settings.dp != "adaptive":
        return None
    return settings.count_noise if settings.count_noise is not None else clients_per_round / 20.0


def resolved_noise_multiplier(
    settings: PrivacySettings, *, num_clients: int, clients_per_round: int, rounds: int
) -> float:
    """z: ``privacy.noise_multiplier``, or the smallest z that meets ``target_epsilon`` after the planned rounds."""
    if settings.target_epsilon is None:
        assert settings.noise_multiplier is not None  # validate: one of the two is set
        return float(settings.noise_multiplier)
    q = clients_per_round / num_clients
    return noise_for_epsilon(q, rounds, settings.target_epsilon, settings.target_delta)


class ClientLevelDP:
    """Clips updates, draws the calibrated noise, adapts the clip and keeps the privacy ledger.

    The noise comes from the mechanism's own seeded generator, checkpointed with the clip and
    the ledger, so a resumed run draws the same noise as an uninterrupted one.
    """

    def __init__(
        self, settings: PrivacySettings, *, num_clients: int, clients_per_round: int, rounds: int, seed: int
    ) -> None:
        self.settings = settings
        self.sampling_rate = clients_per_round / num_clients
        self.noise_multiplier = resolved_noise_multiplier(
            settings, num_clients=num_clients, clients_per_round=clients_per_round, rounds=rounds
        )
        self.count_noise = resolved_count_noise(settings, clients_per_round)
        self.update_multiplier = update_noise_multiplier(self.noise_multiplier, self.count_noise)
        self.clip = float(settings.clip_norm)
        self.ledger = PrivacyLedger(settings.target_delta)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_norms: list[float] = []

    def clip_client(self, parts: Tensors) -> Tensors:
        """One client's parts clipped to the current C (its norm is kept for the adaptive count)."""
        clipped, norm = clip_update(parts, self.clip)
        self.last_norms.append(norm)
        return clipped

    def noise_std(self, count: int) -> float:
        """Std of the noise on an average of ``count`` clipped updates: z_delta * C / count."""
        return self.update_multiplier * self.clip / count

    def noise_like(self, tensor: torch.Tensor, count: int) -> torch.Tensor:
        """Gaussian noise shaped like ``tensor`` (float64, on its device) for an average of ``count`` updates.

        Drawn on the CPU from the mechanism's own generator, so the noise is the same whatever
        ``server.device`` holds the state."""
        noise = torch.randn(tensor.shape, generator=self.generator, dtype=torch.float64)
        return (noise * self.noise_std(count)).to(tensor.device)

    def end_round(self) -> None:
        """Record the round's release in the ledger and adapt C (adaptive clipping); forget the norms."""
        count = len(self.last_norms)
        if count:
            self.ledger.record_round(self.sampling_rate, self.noise_multiplier)
            if self.count_noise is not None:
                unclipped = sum(norm <= self.clip for norm in self.last_norms)
                noise = float(torch.randn((), generator=self.generator, dtype=torch.float64)) * self.count_noise
                fraction = (unclipped + noise) / count
                self.clip *= math.exp(-self.settings.adaptive_lr * (fraction - self.settings.adaptive_quantile))
        self.last_norms = []

    def epsilon(self) -> float:
        return self.ledger.epsilon()

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "ledger": self.ledger.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = float(state["clip"])
        self.ledger.load_state_dict(state["ledger"])
        self.generator.set_state(state["generator"])
