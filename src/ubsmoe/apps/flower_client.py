"""The Flower ClientApp: decode a client's job, train it with the project's ``train_client``, reply.

Clients are logical, workers are a pool: a worker process (a Ray actor in simulation, a
``flwr-clientapp`` process in a deployment) builds the module, the federated data and a
Fabric once from the run's resolved config and keeps them in :data:`_WORKERS`; every job
then loads the server's payload into that module, exactly as the local backend does on
its one shared module. Nothing about a client survives between its jobs (the payload
carries the state, the message carries the client id, the round and the seed), so it
does not matter which worker trains which client, nor that a deployed ClientApp is a new
process per message.

Where the config comes from: the simulation binds it to the ClientApp (it is pickled to
the Ray actors with it); a deployment reads it from the run config key
``ubsmoe-config`` (``flwr run --run-config``), and a SuperNode's ``--node-config`` may
say where its copy of the data lives (``data-dir``, ``cache-dir``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from ubsmoe.fl.backends.flower_env import prepare_flower_env

prepare_flower_env()

import lightning as L  # noqa: E402
import torch  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from ubsmoe.assembly import build_data, build_module, build_run_strategy, fault_policy  # noqa: E402
from ubsmoe.fl.backends.flower_codec import QUERY, TRAIN, decode_job, encode_update  # noqa: E402
from ubsmoe.fl.backends.flower_config import config_from_run_config  # noqa: E402
from ubsmoe.fl.client import train_client  # noqa: E402
from ubsmoe.settings import parse_tiers  # noqa: E402

CLIENT_ID_KEYS = ("client-id", "partition-id")  # deployment: --node-config client-id=N; simulation: partition-id


@dataclass
class Worker:
    """What a worker process builds once and reuses for every client it trains."""

    fabric: Any
    module: Any
    data: Any
    strategy: Any
    faults: Any = None  # the run's FaultPolicy: injected faults are drawn on the client, as locally
    total_rounds: int | None = None  # for the cosine learning-rate schedule
    prox_mu: float = 0.0  # FedProx


_WORKERS: dict[str, Worker] = {}


def node_client_id(context: Context) -> int | None:
    """The client (data owner) this node is, from its node config; None if it does not say."""
    for key in CLIENT_ID_KEYS:
        if key in context.node_config:
            return int(context.node_config[key])  # type: ignore[arg-type]
    return None


def config_for(config_yaml: str | None, context: Context) -> DictConfig:
    """The run's resolved config (bound, or from the run config), with this node's data paths."""
    return config_from_run_config(context.run_config, context.node_config, text=config_yaml)


def build_worker(cfg: DictConfig) -> Worker:
    """Module, data, Fabric and strategy of a run, built the way the runner builds them."""
    tiers = parse_tiers(cfg.tiers)
    if cfg.fabric.num_threads:
        torch.set_num_threads(int(cfg.fabric.num_threads))
    data = build_data(cfg, tiers)
    module = build_module(cfg, tiers, data)
    fabric = L.Fabric(accelerator=cfg.fabric.accelerator, devices=cfg.fabric.devices, precision=cfg.fabric.precision)
    fabric.setup_module(module)
    return Worker(
        fabric=fabric, module=module, data=data, strategy=build_run_strategy(cfg, module),
        faults=fault_policy(cfg), total_rounds=int(cfg.federation.rounds), prox_mu=float(cfg.federation.prox_mu),
    )  # fmt: skip


def worker_for(cfg: DictConfig) -> Worker:
    """This process's worker for the run ``cfg`` (built on first use, then cached)."""
    key = hashlib.sha256(OmegaConf.to_yaml(cfg).encode()).hexdigest()
    if key not in _WORKERS:
        _WORKERS.clear()  # one run per process at a time: free the previous run's model
        _WORKERS[key] = build_worker(cfg)
    return _WORKERS[key]


def handle_train(message: Message, context: Context, config_yaml: str | None = None) -> Message:
    """Train the client named in the message on this process's worker; reply with its update."""
    job = decode_job(message.content)
    cid = job.spec.client_id
    owner = node_client_id(context)
    if "client-id" in context.node_config and owner != cid:
        raise RuntimeError(f"client {cid}: this SuperNode holds client {owner}, not {cid}")
    try:
        worker = worker_for(config_for(config_yaml, context))
        t0 = time.perf_counter()
        update = train_client(
            worker.fabric,
            worker.module,
            job.spec,
            job.payload,
            worker.data.clients[cid],
            round_idx=job.round_idx,
            local_steps=job.local_steps,
            local_epochs=job.local_epochs,
            seed=job.seed,
            regularizer=worker.strategy.client_regularizer(job.spec),
            faults=worker.faults.injection,
            total_rounds=worker.total_rounds,
            prox_mu=worker.prox_mu,
        )
    except Exception as err:  # name the client: Flower's error reply carries only the text
        raise RuntimeError(f"client {cid}: {type(err).__name__}: {err}") from err
    return Message(encode_update(update, time.perf_counter() - t0), reply_to=message)


def handle_query(message: Message, context: Context) -> Message:
    """Tell the server which client (data owner) this node is."""
    cid = node_client_id(context)
    reply = RecordDict({"node": ConfigRecord({} if cid is None else {"client-id": cid})})
    return Message(reply, reply_to=message)


def make_client_app(config_yaml: str | None = None) -> ClientApp:
    """A ClientApp for a run: ``config_yaml`` bound (simulation, tests) or read from the run config."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, config_yaml)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(message, context)

    return app



__all__ = ["QUERY", "TRAIN", "make_client_app"]
