"""``backend=flower``: the sampled clients of a round train in Flower ClientApps (Message API).

The round loop is the project's own (:class:`~ubsmoe.fl.loop.FederatedLoop`: sampler,
strategy, DMR, per-tier evaluation, metrics files, W&B, checkpoints); it runs inside a
Flower ServerApp and this backend is the one thing that differs from ``backend=local``:
each sampled client gets its own train message through ``grid.send_and_receive``, and
the replies come back as :class:`ClientResult` sorted by client id. Node ids are random
per run, so the client id travels in every message; nodes are mapped to clients once
(a ``query`` message, answered from the node config) and again when a sampled client is
not yet known. A reply carrying an error, or missing when ``federation.round_timeout``
expires, becomes a ``ClientResult`` with an error naming the client; what the round does
with it is the loop's policy.

``backend.mode`` says who hosts the ServerApp: ``simulation`` (``run_simulation`` on
Ray, ``backend.num_workers`` actors of ``client_cpus`` / ``client_gpus`` each, one
virtual SuperNode per client), ``deployment`` (``flwr run`` against a SuperLink with one
SuperNode per data owner: ``python src/train.py`` writes the run config and prints the
commands) or ``inprocess`` (an in-process Grid: no Ray, no sockets; for tests and
debugging). Flower is imported only when this backend is used.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ubsmoe import names
from ubsmoe.fl.backends.base import ClientBackend, ClientJob, ClientResult, RoundContext
from ubsmoe.fl.backends.flower_config import config_yaml_of, write_run_config
from ubsmoe.fl.backends.flower_deploy import INSECURE_NOTE, Deployment
from ubsmoe.fl.backends.flower_env import prepare_flower_env, require_flwr

if TYPE_CHECKING:
    from omegaconf import DictConfig


T = TypeVar("T")
log = logging.getLogger(__name__)
QUERY_TIMEOUT = 30.0  # seconds a node gets to say which client it is (a deployed ClientApp starts a process)


class FlowerBackend(ClientBackend):
    """Trains a round's clients as Flower messages on a Grid (set by the host before the first round)."""

    name = "flower"

    def __init__(
        self,
        mode: str = "simulation",
        num_workers: int = 2,
        client_cpus: float = 1.0,
        client_gpus: float = 0.0,
        node_wait: float = 60.0,
        superlink: str = "127.0.0.1:9093",
        insecure: bool = False,
        tls: Mapping[str, Any] | None = None,
        supernode_keys: str | None = None,
        grid: Any = None,
        client_app_factory: Callable[[str], Any] | None = None,
    ) -> None:
        require_flwr()
        self.mode = mode
        self.num_workers = int(num_workers)
        self.client_cpus = float(client_cpus)
        self.client_gpus = float(client_gpus)
        self.node_wait = float(node_wait)
        # deployment only: how the SuperLink is started and reached (the commands host_deployment prints)
        self.deployment = Deployment.from_options(superlink, insecure, tls, supernode_keys)
        self.grid = grid
        # Builds the ClientApp from the run's config YAML (simulation and in-process hosts). The
        # app layer above passes it in (ubsmoe.apps.flower_client.make_client_app), so this
        # transport never imports the code that builds models.
        self.client_app_factory = client_app_factory
        self.round_timeout: float | None = None
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.last_bytes: dict[int, tuple[int, int]] = {}  # client id -> Flower-encoded (down, up) bytes, last round

    # ------------------------------------------------------------------ hosting
    def launch(self, cfg: DictConfig, run: Callable[[], T]) -> T:
        """Run the experiment inside a ServerApp: the one a Grid came from, or one this mode hosts."""
        timeout = cfg.federation.get("round_timeout")
        self.round_timeout = None if timeout is None else float(timeout)
        if self.grid is not None:  # already inside a ServerApp (deployment, or a test's Grid)
            return run()
        return HOSTS[self.mode](self, cfg, run)

    def start(self, loop: RoundContext) -> None:
        super().start(loop)
        if self.grid is None:
            raise RuntimeError("FlowerBackend has no Grid: it runs inside a Flower ServerApp (see launch)")

    # ------------------------------------------------------------------ rounds
    def train_clients(
        self, jobs: list[ClientJob], on_done: Callable[[ClientResult], None] | None = None
    ) -> list[ClientResult]:
        from flwr.app import Message

        from ubsmoe.fl.backends.flower_codec import TRAIN, decode_update, encode_job, encoded_bytes

        loop = self.loop
        self._discover({job.client_id for job in jobs})
        results: dict[int, ClientResult] = {}
        messages = []
        for job in sorted(jobs, key=lambda j: j.client_id):
            node = self.nodes.get(job.client_id)
            if node is None:
                results[job.client_id] = ClientResult(
                    job.client_id, None, error=f"client {job.client_id}: no SuperNode holds this client"
                )
                continue
            content = encode_job(
                job.spec,
                job.payload,
                job.round_idx,
                local_steps=loop.local_steps,
                local_epochs=loop.local_epochs,
                seed=loop.seed,
            )
            sent = encoded_bytes(content)
            message = Message(
                content, dst_node_id=node, message_type=TRAIN, group_id=str(job.round_idx), ttl=self.round_timeout
            )
            messages.append((message, job, sent))
        t0 = time.perf_counter()
        replies = list(self.grid.send_and_receive([m for m, _, _ in messages], timeout=self.round_timeout))
        waited = time.perf_counter() - t0
        job_of = {m.metadata.message_id: (job, sent) for m, job, sent in messages}
        for reply in replies:
            entry = job_of.get(reply.metadata.reply_to_message_id)
            if entry is None:
                continue  # a late reply to an earlier round's message
            job, sent = entry
            cid = job.client_id
            if reply.has_error():
                result = ClientResult(cid, None, error=f"client {cid}: {reply.error.reason}")
            else:
                try:
                    update, seconds = decode_update(reply.content, job.spec)
                    if self.round_timeout is not None and update.simulated_delay > self.round_timeout:
                        # an injected straggler: the same rule as the local backend (a real one misses the Grid's timeout)
                        error = f"timeout: client {cid} declared {update.simulated_delay:g} s, over federation.round_timeout"
                        result = ClientResult(cid, None, error=error, seconds=seconds)
                    else:
                        result = ClientResult(cid, update, seconds=seconds)
                    self.last_bytes[cid] = (sent, encoded_bytes(reply.content))
                except Exception as err:  # noqa: BLE001 - an undecodable reply is that client's failure
                    result = ClientResult(cid, None, error=f"client {cid}: undecodable reply: {err}")
            results[cid] = result
            if on_done is not None:
                on_done(result)
        for _, job, _ in messages:
            if job.client_id not in results:
                results[job.client_id] = ClientResult(
                    job.client_id, None, error=f"timeout: client {job.client_id}: no reply within {waited:.1f} s"
                )
                self.nodes.pop(job.client_id, None)  # ask again next time: its SuperNode may have restarted
        ordered = [results[cid] for cid in sorted(results)]
        for result in ordered:
            if not result.ok:
                log.warning("round %d: %s", jobs[0].round_idx + 1, result.error)
        self._write_bytes(jobs, ordered)
        return ordered

    def _write_bytes(self, jobs: list[ClientJob], results: list[ClientResult]) -> None:
        """``flower_bytes.jsonl``: per client and round, bytes as Flower encodes them vs as the strategy counts them."""
        import json

        loop = self.loop
        output_dir = getattr(loop, "output_dir", None)
        if output_dir is None:
            return
        payloads = {job.client_id: job for job in jobs}
        with (Path(output_dir) / "flower_bytes.jsonl").open("a") as f:
            for result in results:
                if not result.ok or result.client_id not in self.last_bytes:
                    continue
                job = payloads[result.client_id]
                down, up = self.last_bytes[result.client_id]
                record = {
                    "round": job.round_idx + 1,
                    "client": result.client_id,
                    "down_flower": down,
                    "down_project": loop.strategy.payload_bytes(job.payload, job.spec),
                    "up_flower": up,
                    "up_project": loop.strategy.update_bytes(result.update),
                }
                f.write(json.dumps(record) + "\n")

    def _discover(self, needed: set[int]) -> None:
        """Map clients to nodes: ask every node not yet known which client it is (until ``needed`` are known)."""
        from flwr.app import Message, RecordDict

        from ubsmoe.fl.backends.flower_codec import QUERY

        deadline = time.monotonic() + self.node_wait
        while True:
            known = set(self.nodes.values())
            new = [n for n in self.grid.get_node_ids() if n not in known]
            if new:
                queries = [Message(RecordDict(), dst_node_id=n, message_type=QUERY, group_id="discover") for n in new]
                # bounded even without a round timeout: a node that went away must not hang the round
                for reply in self.grid.send_and_receive(queries, timeout=max(self.node_wait, QUERY_TIMEOUT)):
                    if reply.has_error():
                        continue
                    node = reply.metadata.src_node_id
                    record = reply.content.config_records.get("node", {})
                    if "client-id" in record:
                        self.nodes[int(record["client-id"])] = node
            if needed <= set(self.nodes) or time.monotonic() >= deadline:
                return
            time.sleep(0.5)


# ---------------------------------------------------------------------- hosts
def _client_app(backend: FlowerBackend, cfg: DictConfig) -> Any:
    """The ClientApp of this run, from the factory the app layer handed the backend."""
    if backend.client_app_factory is None:
        raise RuntimeError("FlowerBackend.client_app_factory is not set: build runs through ubsmoe.runner")
    return backend.client_app_factory(config_yaml_of(cfg))


def host_inprocess(backend: FlowerBackend, cfg: DictConfig, run: Callable[[], T]) -> T:
    """An in-process Grid with one node per client; the ClientApp runs in this process."""
    from ubsmoe.fl.backends.flower_inprocess import InProcessGrid  # deferred: imports Flower

    num_clients = int(cfg.federation.num_clients)
    nodes = [{"partition-id": cid, "num-partitions": num_clients} for cid in range(num_clients)]
    backend.grid = InProcessGrid(_client_app(backend, cfg), nodes)
    return run()


def ray_backend_config(backend: FlowerBackend) -> dict[str, Any]:
    """Flower's simulation backend config: ``num_workers`` actors, Ray on loopback, no dashboard."""
    resources: dict[str, float] = {"num_cpus": backend.client_cpus, "num_gpus": backend.client_gpus}
    init_args: dict[str, Any] = {
        "num_cpus": max(1, math.ceil(backend.num_workers * backend.client_cpus)),
        "include_dashboard": False,
        "_node_ip_address": "127.0.0.1",
    }
    if backend.client_gpus > 0:
        init_args["num_gpus"] = math.ceil(backend.num_workers * backend.client_gpus)
    return {"client_resources": resources, "init_args": init_args}


def host_simulation(backend: FlowerBackend, cfg: DictConfig, run: Callable[[], T]) -> T:
    """``run_simulation`` on Ray: the ServerApp main is ``run`` on the simulation's Grid."""
    prepare_flower_env(Path(cfg.paths.output_dir) / "flwr")
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    outcome: list[T] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        del context
        backend.grid = grid
        outcome.append(run())

    run_simulation(
        server_app=server_app,
        client_app=_client_app(backend, cfg),
        num_supernodes=int(cfg.federation.num_clients),
        backend_config=ray_backend_config(backend),  # type: ignore[arg-type]
    )
    backend.grid = None
    if not outcome:
        raise RuntimeError("the Flower simulation ended without running the federation (see the log above)")
    return outcome[0]


def host_deployment(backend: FlowerBackend, cfg: DictConfig, run: Callable[[], T]) -> T | None:
    """Outside a SuperLink a deployment cannot start here: write the run config and say how to start it.

    Writes ``flower_run_config.toml`` (the run) and ``flwr/config.toml`` (the flwr CLI's
    connection to the SuperLink: its address and the CA certificate, or ``insecure`` on
    loopback) in the run directory, and prints the commands in order (also saved as
    ``flower_deployment.txt``).
    """
    del run
    out = Path(cfg.paths.output_dir)
    path = write_run_config(cfg, out / "flower_run_config.toml")
    home = out / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(backend.deployment.connection_toml())
    app = Path(__file__).resolve().parents[4] / "flower-app"  # the checkout's Flower App folder
    steps = backend.deployment.instructions(
        app if app.is_dir() else "flower-app", path, home, int(cfg.federation.num_clients)
    )
    (out / "flower_deployment.txt").write_text(steps + "\n")
    if backend.deployment.insecure:
        log.warning("%s", INSECURE_NOTE)
    print(
        "backend.mode=deployment: the federation runs on a SuperLink with one SuperNode per data owner.\n"
        f"Run config written to {path}; the flwr CLI's connection to the SuperLink to {home / 'config.toml'}.\n"
        f"{steps}\n"
        "(docs/flower.md walks through a two-machine deployment)"
    )
    return None


HOSTS: dict[str, Callable[..., Any]] = {
    "simulation": host_simulation,
    "deployment": host_deployment,
    "inprocess": host_inprocess,
}
assert tuple(HOSTS) == names.FLOWER_MODES, "ubsmoe.names.FLOWER_MODES and HOSTS must list the same modes"

