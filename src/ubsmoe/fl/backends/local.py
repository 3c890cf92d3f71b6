"""``backend=local``: the sampled clients train one after another in this process, on the one shared module."""

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
        results = []
        for job in sorted(jobs, key=lambda j: j.client_id):
            t0 = time.perf_counter()
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
                total_rounds=loop.rounds,
                prox_mu=loop.prox_mu,
            )
            result = ClientResult(job.client_id, update, seconds=time.perf_counter() - t0)
            results.append(result)
            if on_done is not None:
                on_done(result)
        return results
