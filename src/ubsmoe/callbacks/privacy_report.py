"""Epsilon after every round (metrics.jsonl and the console), and the DP mechanism's state in the checkpoint.

Runs before :class:`~ubsmoe.callbacks.metrics_writer.MetricsWriter`: it adds ``epsilon``
(at ``privacy.target_delta``; null when there is no bound, i.e. noise multiplier 0), ``dp_clip_norm`` (the clip after this round's adaptation)
and ``dp_noise_multiplier`` to every tier's record of the round. Being a stateful callback,
it carries the mechanism's state (clip, accountant ledger, noise generator) in the
checkpoint, so a resumed run reports the same epsilon and draws the same noise.
"""

from __future__ import annotations

import math
from typing import Any

from ubsmoe.privacy.dp import ClientLevelDP


class PrivacyReport:
    def __init__(self, mechanism: ClientLevelDP, console: Any) -> None:
        self.mechanism = mechanism
        self.console = console

    def on_round_end(self, loop: Any, summary: Any) -> None:
        epsilon = self.mechanism.epsilon()
        fields = {
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "dp_clip_norm": self.mechanism.clip,
            "dp_noise_multiplier": self.mechanism.noise_multiplier,
        }
        for tier in loop.tiers:
            summary.tier_extras.setdefault(tier.name, {}).update(fields)
        self.console.print(
            f"round {summary.round}: client-level DP epsilon = {epsilon:.4g} at delta = {self.mechanism.ledger.delta:g} "
            f"({self.mechanism.ledger.rounds} released rounds, noise multiplier {self.mechanism.noise_multiplier:.4g}, "
            f"clip {self.mechanism.clip:.4g})",
            highlight=False,
        )

    def state_dict(self) -> dict[str, Any]:
        return self.mechanism.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mechanism.load_state_dict(state)
