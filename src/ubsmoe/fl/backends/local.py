"""``backend=local``: the sampled clients train one after another in this process, on the one shared module.

A client that raises becomes a :class:`ClientResult` with the error (the round goes on with
the others; the loop decides what to drop). ``federation.round_timeout`` is applied to the
delay a straggler declares, not to real wall time: clients run one after another here, so
real time would make the outcome depend on the machine; the declared delay keeps it
reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ubsmoe.fl.backends.base import ClientBackend, ClientJob, ClientResult
from ubsmoe.fl.client import train_client


class LocalBackend(ClientBackend):
    """Sequential clients on the loop's Fabric and module (the backbone is built once)."""

    name = "local"

    def train_clients(
        self, jobs: list[ClientJob], on_done: Callable[[ClientResult], None] | None = None
    ) -> list[ClientResult]:
        loop = self.loop
        policy = getattr(loop, "faults", None)
        timeout = policy.round_timeout if policy is not None else None
        results = []
        for job in sorted(jobs, key=lambda j: j.client_id):
            t0 = time.perf_counter()
            try:
                update = train_client(
                    loop.fabric,
                    loop.module,
                    job.spec,
                    job.payload,
                    loop.data.clients[job.client_id],
                    round_idx=job.round_idx,
                    local_steps=loop.local_steps,
                    local_epochs=loop.local_epochs,
                    seed=loop.seed,
                    regularizer=loop.strategy.client_regularizer(job.spec),
                    faults=policy.injection if policy is not None else None,
                    total_rounds=loop.rounds,
                    prox_mu=loop.prox_mu,
                )
            except Exception as err:  # noqa: BLE001 - any client failure is reported, never fatal to the round
                result = ClientResult(job.client_id, None, error=f"{type(err).__name__}: {err}")
            else:
                seconds = time.perf_counter() - t0 + update.simulated_delay
                if timeout is not None and update.simulated_delay > timeout:
                    error = f"timeout: no reply within federation.round_timeout={timeout:g}s (declared delay {update.simulated_delay:g}s)"
                    result = ClientResult(job.client_id, None, error=error, seconds=seconds)
                else:
                    result = ClientResult(job.client_id, update, seconds=seconds)
            if result.seconds == 0.0:
                result.seconds = time.perf_counter() - t0
            results.append(result)
            if on_done is not None:
                on_done(result)
        return results
