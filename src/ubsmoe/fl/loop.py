"""The federated rounds on Lightning Fabric: sample, train locally, aggregate, evaluate, checkpoint.

One round:

1. the sampler picks ``clients_per_round`` clients; the strategy shapes each one's payload;
2. the backend trains the sampled clients (``backend=local``: one after another on the one
   shared module, :func:`~ubsmoe.fl.client.train_client`) and returns results by client id;
   each reply is received onto the server's device (``server.device``, :mod:`ubsmoe.fl.devices`)
   and checked against what its client was sent (:mod:`ubsmoe.fl.validation`):
   failed, timed-out, non-finite or malformed ones are dropped and logged to ``faults.jsonl``;
3. the strategy aggregates the good updates into the server state (with fewer than
   ``federation.min_replies`` of them the round is skipped: state, phi and PG defaults stay);
   and the server optimizer (:mod:`~ubsmoe.fl.server_optim`; plain replacement by default)
   steps on the change;
4. ``fabric.call("on_aggregate_end")``: the DMR callback updates phi;
5. every ``eval_every`` rounds (and the last) the global model is evaluated once per tier;
6. ``fabric.call("on_round_end")``: metrics files, console table, W&B expert statistics;
7. the state is checkpointed atomically (SIGTERM / Ctrl-C wait for a write in progress).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ubsmoe.settings import Tier
from ubsmoe.errors import ConfigError
from ubsmoe.fl.backends import ClientBackend, ClientJob, ClientResult, LocalBackend
from ubsmoe.fl.checkpoint import CHECKPOINT_DIR, CheckpointStore, SignalGuard, pause_for_test
from ubsmoe.fl.aggregation import ServerAggregation
from ubsmoe.fl.client import ClientPayload, ClientSpec, ClientUpdate, load_payload
from ubsmoe.fl.faults import DroppedClient, FaultLog, FaultPolicy, poisoned_records
from ubsmoe.fl.server import ClientSampler, ServerState, owning_layer
from ubsmoe.fl.server_optim import ServerOptimizer
from ubsmoe.fl.strategies.base import Strategy
from ubsmoe.fl.summary import RoundSummary, TierEvaluation
from ubsmoe.fl.validation import screen_results
from ubsmoe.smoe.flops import mean_over_lengths, token_lengths

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from ubsmoe.data.datamodule import FederatedData
    from ubsmoe.model import FederatedModel

# The parts of a round timings.jsonl times (``other`` is the remainder): local training of
# the sampled clients, aggregation with the server optimizer and DMR, evaluation of every
# tier, the on_round_end callbacks (metrics files, console, loggers, diagnostics), checkpoint.
ROUND_PHASES = ("clients", "aggregate", "evaluate", "round_end_callbacks", "checkpoint")


class FederatedLoop:
    """Runs the rounds; holds the server state, the sampler and the callbacks' checkpointable state."""

    def __init__(
        self,
        *,
        fabric: Fabric,
        module: FederatedModel,
        data: FederatedData,
        specs: list[ClientSpec],
        tier_specs: list[ClientSpec],
        strategy: Strategy,
        sampler: ClientSampler,
        callbacks: list[Any],
        seed: int,
        rounds: int,
        local_steps: int | None,
        local_epochs: int | None,
        eval_every: int,
        output_dir: Path,
        checkpoint: bool,
        fingerprint: dict[str, Any],
        backend: ClientBackend | None = None,
        progress: bool = True,
        faults: FaultPolicy | None = None,
        checkpoint_keep: int = 2,
        server_optimizer: ServerOptimizer | None = None,
        prox_mu: float = 0.0,
        server_device: torch.device | str = "cpu",
        aggregation: ServerAggregation | None = None,
        setup_seconds: dict[str, float] | None = None,
    ) -> None:
        init_start = time.perf_counter()
        self.fabric = fabric
        self.module = module
        self.data = data
        self.specs = specs
        self.tier_specs = tier_specs
        self.tiers: list[Tier] = [s.tier for s in tier_specs]
        self.strategy = strategy
        self.sampler = sampler
        self.callbacks = callbacks
        self.seed = seed
        self.rounds = rounds
        self.local_steps = local_steps
        self.local_epochs = local_epochs
        self.eval_every = eval_every
        self.output_dir = Path(output_dir)
        self.checkpoint = checkpoint
        self.fingerprint = fingerprint
        self.progress = progress
        self.backend = backend or LocalBackend()
        self.faults = faults or FaultPolicy()
        self.fault_log = FaultLog(self.output_dir)
        self.checkpoints = CheckpointStore(self.output_dir / CHECKPOINT_DIR, keep=checkpoint_keep)
        self.last_checkpoint: Path | None = None
        self.server_optimizer = server_optimizer or ServerOptimizer()
        self.prox_mu = float(prox_mu)  # FedProx's mu, passed to every client's training
        self.aggregation = aggregation or ServerAggregation()  # robust rule and client-level DP around the strategy
        # The server state lives on one device (server.device); every reply is moved there once.
        self.server_device = torch.device(server_device)
        self.server = ServerState(
            round=0, global_state=module.trainable_state(), pg_defaults=module.pg_defaults()
        ).to(self.server_device)
        self.strategy.place(self.server_device)
        self.elapsed_before = 0.0  # wall time of the rounds run before a resume
        self.eval_lengths = token_lengths(self.data.eval_loaders)
        self.dense_flops_per_example = self._dense_flops()
        self._tier_flops_cache = [self._tier_flops(i) for i in range(len(self.tiers))]
        self.last_evaluation: dict[str, TierEvaluation] | None = None
        # what building the run cost this process, this loop's construction counted as engine;
        # the first round it runs records it in timings.jsonl
        self._setup_seconds = dict(setup_seconds or {})
        if self._setup_seconds:
            engine = self._setup_seconds.get("engine", 0.0) + time.perf_counter() - init_start
            self._setup_seconds["engine"] = engine

    # ----------------------------------------------------------------------------- tiers
    def tier_spec(self, tier_index: int) -> ClientSpec:
        """The compute shape (K_c or rank) of a tier."""
        return self.tier_specs[tier_index]

    def _dense_flops(self) -> float:
        """Forward FLOPs per evaluation example of the reference model with full-rank LoRA (the backbone
        adapter's reference: the dense FFN for moefy, the model at its configured top-k for native)."""
        return mean_over_lengths(self.eval_lengths, self.module.reference_flops_per_example)

    def _tier_flops(self, tier_index: int) -> float:
        """Forward FLOPs per evaluation example at the tier's K / rank (analytic)."""
        spec = self.tier_spec(tier_index)
        self.module.set_client(k=spec.k, rank=spec.rank, tier_index=tier_index)
        return mean_over_lengths(self.eval_lengths, self.module.flops_per_example)

    def tier_flops(self, tier_index: int) -> float:
        """Mean forward FLOPs per evaluation example of a tier (fixed for the run: computed once)."""
        return self._tier_flops_cache[tier_index]

    # ----------------------------------------------------------------------------- rounds
    def run(self) -> dict[str, TierEvaluation] | None:
        """Run the remaining rounds; return the last per-tier evaluation.

        SIGTERM and Ctrl-C raise :class:`~ubsmoe.fl.checkpoint.RunInterrupted` between
        checkpoint writes (the round in progress is abandoned; a write in progress finishes).
        """
        self.fabric.call("on_fit_start", loop=self)
        self.fault_log.rewrite()
        self._trim_timings()
        self.checkpoints.clean_partial()
        self.backend.start(self)
        start = time.perf_counter()
        self._guard = SignalGuard()
        try:
            with self._guard, Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                disable=not self.progress,
            ) as bar:
                rounds_task = bar.add_task("rounds", total=self.rounds, completed=self.server.round)
                clients_task = bar.add_task("clients", total=self.sampler.per_round)
                while self.server.round < self.rounds:
                    summary = self.run_round(bar, clients_task, start)
                    bar.update(rounds_task, completed=summary.round)
        finally:
            self.backend.close()
        self.fabric.call("on_fit_end", loop=self)
        return self.last_evaluation

    def run_round(self, bar: Progress, clients_task: Any, start: float) -> RoundSummary:
        round_start = time.perf_counter()
        phases = dict.fromkeys(ROUND_PHASES, 0.0)
        round_idx = self.server.round  # 0-based index of the round being run
        client_ids = self.sampler.sample()
        bar.reset(clients_task, total=len(client_ids))
        jobs = []
        for cid in client_ids:
            spec = self.strategy.client_spec(self.specs[cid])
            jobs.append(ClientJob(spec, self.strategy.configure_client(self.server, spec), round_idx))
        t0 = time.perf_counter()
        results = self.receive(self.backend.train_clients(jobs, on_done=lambda _result: bar.advance(clients_task)))
        busy = phases["clients"] = time.perf_counter() - t0
        pause_for_test("round", round_idx + 1, self.output_dir / f"paused-round-{round_idx + 1}")
        updates, dropped = screen_results(
            jobs, results, round_number=round_idx + 1, max_update_norm=self.faults.max_update_norm
        )
        payloads = {job.client_id: job.payload for job in jobs}
        for update in updates:
            update.bytes_received = self.strategy.payload_bytes(payloads[update.spec.client_id], update.spec)
            update.bytes_sent = self.strategy.update_bytes(update)
        skipped = len(updates) < self.faults.min_replies
        self._report_faults(bar, round_idx + 1, len(jobs), dropped, skipped)
        accepted = [(u.spec.client_id, u.spec.tier.name) for u in updates]
        self.fault_log.add(poisoned_records(self.faults.injection, self.seed, round_idx, accepted))
        if not skipped:
            t0 = time.perf_counter()
            before = self.server.global_state
            # the strategy's aggregation, with the robust rule / DP mechanism; sets the utilization too
            averaged = self.aggregation.aggregate(self.strategy, self.server, updates, payloads)
            self.server_optimizer.step(before, self.server)
            self.fabric.call("on_aggregate_end", loop=self, round_idx=round_idx, updates=averaged)
            phases["aggregate"] = time.perf_counter() - t0
        self.server.round = round_idx + 1

        evaluation = None
        if self.server.round % self.eval_every == 0 or self.server.round == self.rounds:
            t0 = time.perf_counter()
            evaluation = self.evaluate()
            phases["evaluate"] = time.perf_counter() - t0
            busy += phases["evaluate"]
            self.last_evaluation = evaluation
        summary = RoundSummary(
            round=self.server.round,
            client_ids=client_ids,
            updates=updates,
            evaluation=evaluation,
            utilization=dict(self.server.utilization),
            phi=self.global_phi(),
            wall_time=self.elapsed_before + time.perf_counter() - start,
            round_seconds=time.perf_counter() - round_start,
            train_eval_seconds=busy,
            dropped=dropped,
            skipped=skipped,
            broadcast_bytes=self.strategy.broadcast_bytes(self.server),
        )
        t0 = time.perf_counter()
        self.fabric.call("on_round_end", loop=self, summary=summary)
        phases["round_end_callbacks"] = time.perf_counter() - t0
        if self.checkpoint:
            t0 = time.perf_counter()
            state = self.state_dict(summary.wall_time)
            guard = getattr(self, "_guard", None)
            if guard is not None:
                with guard.deferred():
                    self.last_checkpoint = self.checkpoints.save(state, self.server.round)
            else:
                self.last_checkpoint = self.checkpoints.save(state, self.server.round)
            phases["checkpoint"] = time.perf_counter() - t0
        self._write_timing(summary, time.perf_counter() - round_start, phases)
        return summary

    def receive(self, results: list[ClientResult]) -> list[ClientResult]:
        """The message boundary: every tensor a reply carries is detached and moved once to the server's device.

        Whatever backend ran the client and wherever its module sits, validation, the
        strategy, the server optimizer and the callbacks see the server's device alone. A
        reply that is no :class:`ClientUpdate` is left for validation to reject.
        """
        for result in results:
            if isinstance(result.update, ClientUpdate):
                result.update = result.update.to(self.server_device)
        return results

    def _report_faults(
        self, bar: Progress, round_number: int, sampled: int, dropped: list[DroppedClient], skipped: bool
    ) -> None:
        """faults.jsonl gets the dropped clients; the console says how many and why, and if the round is skipped."""
        self.fault_log.add(dropped)
        if dropped:
            bar.console.print(
                f"[yellow]round {round_number}: dropped {len(dropped)} of {sampled} client(s)[/yellow]: "
                + "; ".join(f"client {d.client} ({d.tier}) {d.kind}: {d.reason}" for d in dropped),
                highlight=False,
            )
        if skipped:
            bar.console.print(
                f"[red]round {round_number} skipped[/red]: {sampled - len(dropped)} good replies, fewer than "
                f"federation.min_replies={self.faults.min_replies}; the global state, phi and PG defaults are kept",
                highlight=False,
            )

    def _trim_timings(self) -> None:
        """A resumed run drops the timing records of rounds after its checkpoint (they are run again)."""
        path = self.output_dir / "timings.jsonl"
        if not path.is_file():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("round", 0) <= self.server.round]
        if len(kept) != len(lines):
            path.write_text("".join(line + "\n" for line in kept))

    def _write_timing(self, summary: RoundSummary, total: float, phases: dict[str, float]) -> None:
        """``timings.jsonl``: where a round's wall time went, and what each tier's local training cost.

        ``phases`` splits the round (docs/outputs.md); ``other`` is what no phase covers
        (sampling, payloads, reply validation, fault records). The first round a process
        runs also carries ``setup_seconds``, what building the run cost that process.
        """
        phases = {**phases, "other": max(total - sum(phases.values()), 0.0)}
        record = {
            "round": summary.round,
            "round_seconds": round(total, 4),
            "train_eval_seconds": round(summary.train_eval_seconds, 4),
            "overhead_seconds": round(total - summary.train_eval_seconds, 4),
            "phases": {name: round(seconds, 4) for name, seconds in phases.items()},
            "tiers": self._tier_costs(summary.updates),
        }
        if self._setup_seconds:
            record["setup_seconds"] = {name: round(seconds, 4) for name, seconds in self._setup_seconds.items()}
            self._setup_seconds = {}
        with (self.output_dir / "timings.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _tier_costs(self, updates: list[ClientUpdate]) -> dict[str, dict[str, Any]]:
        """Per tier, over its clients whose replies were kept this round: local steps, training seconds per
        step, and the largest CUDA peak memory of one client (None off CUDA, or for a tier without clients)."""
        costs: dict[str, dict[str, Any]] = {}
        for tier_index, tier in enumerate(self.tiers):
            members = [u for u in updates if u.spec.tier_index == tier_index]
            steps = sum(u.num_steps for u in members)
            seconds = sum(u.train_seconds for u in members)
            peaks = [u.peak_memory_bytes for u in members if u.peak_memory_bytes is not None]
            costs[tier.name] = {
                "clients": len(members),
                "steps": steps,
                "train_seconds_per_step": round(seconds / steps, 6) if steps else None,
                "peak_memory_bytes": max(peaks) if peaks else None,
            }
        return costs

    def global_phi(self) -> dict[str, torch.Tensor]:
        """The global phi per SMoE layer (empty for dense methods)."""
        layers = list(self.server.utilization)
        if not layers:
            return {}
        return {owning_layer(n, layers): self.server.global_state[n] for n in self.module.phi_names()}

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, TierEvaluation]:
        """The global model on every evaluation split, once per tier at that tier's K / rank.

        What is computed on the splits (torchmetrics per batch, generation, likelihood of answer
        words...) is the task's business (:meth:`ubsmoe.tasks.base.Task.evaluate`). Tiers whose
        clients would receive the same model (the same K and rank, the same payload tensors,
        and no per-tier parameter such as FLAME's tier scale) share one evaluation: a dense
        method's four tiers are one model, evaluated once, with the same numbers.
        """
        module = self.module
        module.eval()
        results: dict[str, TierEvaluation] = {}
        evaluated: list[tuple[tuple[Any, ...], ClientPayload, TierEvaluation]] = []
        for tier_index, tier in enumerate(self.tiers):
            # Each tier sees the global model exactly as a client of that tier receives it.
            spec = self.tier_spec(tier_index)
            payload = self.strategy.configure_client(self.server, spec)
            shape = (spec.k, spec.rank, tier_index if module.method.tier_scale else None)
            same = next((ev for key, sent, ev in evaluated if key == shape and sent.same_as(payload)), None)
            if same is not None:
                results[tier.name] = replace(
                    same, tier=tier.name, beta=tier.beta, metrics=dict(same.metrics),
                    utilization={layer: u.clone() for layer, u in same.utilization.items()},
                    max_load_fraction=dict(same.max_load_fraction),
                )  # fmt: skip
                continue
            load_payload(module, spec, payload)
            module.reset_telemetry()
            scored = module.evaluate(self.data.eval_loaders, self.fabric)
            telemetry = module.telemetry()
            results[tier.name] = TierEvaluation(
                tier=tier.name,
                beta=tier.beta,
                k=spec.k,
                rank=spec.rank,
                metrics=scored.metrics,
                main_metric=scored.main_metric,
                flops_per_example=self.tier_flops(tier_index),
                utilization={
                    layer: t["expert_tokens"].double().cpu() / max(float(t["tokens"]), 1.0)  # a record, kept on CPU
                    for layer, t in telemetry.items()
                },
                max_load_fraction={layer: float(t["max_load_fraction"]) for layer, t in telemetry.items()},
            )
            evaluated.append((shape, payload, results[tier.name]))
        module.train()
        return results

    # ----------------------------------------------------------------------------- state
    def _stateful_callbacks(self) -> list[Any]:
        """Callbacks whose state is checkpointed.

        Not the LightningModule: Fabric registers it among its callbacks (the same list), and
        its state_dict is the whole model, frozen backbone included (that made a smoke
        checkpoint 90 MB); the trainable part is already in the server state.
        """
        return [cb for cb in self.callbacks if hasattr(cb, "state_dict") and not isinstance(cb, torch.nn.Module)]

    def backbone_reference(self) -> dict[str, Any]:
        """What identifies the frozen backbone a checkpoint was trained on (its weights are not stored)."""
        frozen = [p for p in self.module.parameters() if not p.requires_grad]
        return {
            "backbone": str(self.module.model_settings.backbone),
            "frozen_tensors": len(frozen),
            "frozen_numel": int(sum(p.numel() for p in frozen)),
        }

    def state_dict(self, wall_time: float) -> dict[str, Any]:
        """Everything training changes, as tensors and primitive containers (``torch.load(weights_only=True)``)."""
        numpy_state = np.random.get_state(legacy=False)
        return {
            "fingerprint": self.fingerprint,
            "backbone": self.backbone_reference(),
            "server": self.server.state_dict(),
            "sampler": self.sampler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in self._stateful_callbacks()},
            "faults": self.fault_log.state_dict(),
            "server_optimizer": self.server_optimizer.state_dict(),
            "last_evaluation": (
                None
                if self.last_evaluation is None
                else {tier: asdict(ev) for tier, ev in self.last_evaluation.items()}
            ),
            "wall_time": wall_time,
            "rng": {
                "python": random.getstate(),
                "numpy": {
                    "bit_generator": numpy_state["bit_generator"],
                    "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                    "pos": int(numpy_state["state"]["pos"]),
                    "has_gauss": int(numpy_state["has_gauss"]),
                    "gauss": float(numpy_state["gauss"]),
                },
                "torch": torch.get_rng_state(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_backbone, current = state.get("backbone"), self.backbone_reference()
        if saved_backbone is not None and saved_backbone != current:
            raise ConfigError(
                "model.backbone", current["backbone"], f"the backbone the checkpoint was trained on ({saved_backbone})"
            )
        self.server = ServerState.from_state_dict(state["server"]).to(self.server_device)
        self.sampler.load_state_dict(state["sampler"])
        self.strategy.load_state_dict(state["strategy"])
        self.strategy.place(self.server_device)
        self.server_optimizer.load_state_dict(state.get("server_optimizer", {}))
        for cb in self._stateful_callbacks():
            if hasattr(cb, "load_state_dict") and type(cb).__name__ in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][type(cb).__name__])
        self.fault_log.load_state_dict(state.get("faults", {}))
        evaluation = state["last_evaluation"]
        self.last_evaluation = (
            None if evaluation is None else {tier: TierEvaluation(**ev) for tier, ev in evaluation.items()}
        )
        self.elapsed_before = float(state["wall_time"])
        python_state = state["rng"]["python"]
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        rng = state["rng"]["numpy"]
        np.random.set_state(
            {
                "bit_generator": rng["bit_generator"],
                "state": {"key": rng["key"].numpy().astype(np.uint32), "pos": rng["pos"]},
                "has_gauss": rng["has_gauss"],
                "gauss": rng["gauss"],
            }
        )
        torch.set_rng_state(state["rng"]["torch"])
