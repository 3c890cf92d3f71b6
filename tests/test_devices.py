"""The one device rule, checked without a GPU.

Client replies arrive as :class:`Elsewhere` tensors: CPU tensors that behave as if they
lived on another device (an accelerator): any operation that mixes one with an ordinary
tensor that is not zero-dimensional raises, as torch does for ``cuda:0`` and ``cpu``, and
``.to(device)`` returns an ordinary tensor. Every method (``ubsmoe.names.METHODS``), every
server optimizer it accepts and DMR's phi update run two rounds of the real loop's receive
path on such replies: nothing may raise, and the whole server state must come out ordinary
CPU tensors.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import compose_config
from rich.progress import Progress
from torch.utils._pytree import tree_flatten

from ubsmoe import names
from ubsmoe.callbacks.dmr import DMRCallback
from ubsmoe.fl.backends import ClientBackend, ClientJob, ClientResult
from ubsmoe.fl.client import ClientPayload, ClientSpec, ClientUpdate, load_payload, make_client_specs, make_tier_specs
from ubsmoe.fl.devices import move_tensors
from ubsmoe.fl.loop import FederatedLoop
from ubsmoe.fl.server import ClientSampler
from ubsmoe.fl.server_optim import SERVER_OPTIMIZERS, build_server_optimizer
from ubsmoe.fl.strategies import STRATEGIES, StrategyContext, build_strategy
from ubsmoe.settings import MethodSettings, ServerSettings, Tier, method_settings

NUM_EXPERTS, RANK, LAYER = 4, 4, "enc.ffn"
TIERS = [Tier("weak", 0.5, 0.5), Tier("strong", 1.0, 0.5)]


class Elsewhere(torch.Tensor):
    """A CPU tensor standing for one on another device (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if func in (torch.Tensor.to, torch.Tensor.cpu) and _moves(func, flat):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
                return torch.Tensor.as_subclass(out.clone(), torch.Tensor)
        if func is not torch.Tensor.copy_:  # copying across devices is allowed, as in torch
            with torch._C.DisableTorchFunctionSubclass():
                ordinary = [
                    t for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, cls) and t.dim() > 0
                ]
            if ordinary:
                raise RuntimeError(f"Expected all tensors to be on the same device ({func.__name__}: elsewhere, cpu)")
        return super().__torch_function__(func, types, args, kwargs)


def _moves(func: Any, flat: list[Any]) -> bool:
    """``.cpu()``, or ``.to`` given a device (not only a dtype)."""
    return func is torch.Tensor.cpu or any(isinstance(x, (torch.device, str)) for x in flat)


def elsewhere(value: Any) -> Any:
    """``value`` with every tensor turned into an :class:`Elsewhere` tensor (nested dicts)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().as_subclass(Elsewhere)
    if isinstance(value, dict):
        return {k: elsewhere(v) for k, v in value.items()}
    return value


def ordinary_cpu(value: Any) -> bool:
    """Every tensor in ``value`` is an ordinary CPU tensor."""
    flat, _ = tree_flatten(value)
    return all(type(t) is torch.Tensor and t.device.type == "cpu" for t in flat if isinstance(t, torch.Tensor))


def test_elsewhere_tensors_mix_like_two_devices() -> None:
    """The stand-in raises where torch raises for cuda:0 and cpu, and moves to an ordinary tensor."""
    far = elsewhere(torch.ones(3))
    with pytest.raises(RuntimeError, match="same device"):
        _ = far + torch.ones(3)
    assert type(far * 2.0) is Elsewhere and type(far.to(torch.float64)) is Elsewhere
    assert type(far.to("cpu")) is torch.Tensor and type(move_tensors({"a": far}, "cpu")["a"]) is torch.Tensor


class FakeModule:
    """The module's side the server touches: trainable state, PG defaults, phi names, FLOPs, client shape."""

    def __init__(self, method: MethodSettings) -> None:
        g = torch.Generator().manual_seed(0)
        shapes = {
            "enc.q.lora_A.default.weight": (RANK, 6),
            "enc.q.lora_B.default.weight": (5, RANK),
            "head.weight": (2, 5),
        }
        if method.sparse:
            shapes |= {
                f"{LAYER}.router.weight": (NUM_EXPERTS, 6),
                f"{LAYER}.phi": (NUM_EXPERTS,),
                f"{LAYER}.lora.lora_A1": (NUM_EXPERTS, 2, 6),
                f"{LAYER}.tier_scale": (len(TIERS),),
            }
        self.state = {n: torch.randn(s, generator=g) * 0.1 for n, s in shapes.items()}
        self.defaults = {LAYER: torch.randn(NUM_EXPERTS, 6, generator=g)} if method.sparse and method.pg.router else {}
        self.sparse = method.sparse

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.state.items()}

    def pg_defaults(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.defaults.items()}

    def phi_names(self) -> list[str]:
        return [f"{LAYER}.phi"] if self.sparse else []

    def expert_tensor_names(self) -> list[str]:
        return [f"{LAYER}.lora.lora_A1"] if self.sparse else []

    def set_client(self, *, k: int | None, rank: int | None, tier_index: int) -> None:
        del k, rank, tier_index

    def flops_per_example(self, length: int) -> float:
        return float(length)

    reference_flops_per_example = flops_per_example


class FakeData:
    eval_loaders: dict[str, Any] = {}


class FakeFabric:
    """``call`` as Lightning Fabric does it, for the callbacks that define the hook."""

    def __init__(self, callbacks: list[Any]) -> None:
        self.callbacks = callbacks

    def call(self, hook: str, **kwargs: Any) -> None:
        for cb in self.callbacks:
            if hasattr(cb, hook):
                getattr(cb, hook)(**kwargs)


class ElsewhereBackend(ClientBackend):
    """Every sampled client returns a perturbed copy of its payload, all tensors :class:`Elsewhere`."""

    def __init__(self, sparse: bool) -> None:
        self.sparse = sparse

    def train_clients(self, jobs: list[ClientJob], on_done: Any = None) -> list[ClientResult]:
        results = []
        for job in jobs:
            g = torch.Generator().manual_seed(1000 * job.round_idx + job.client_id)
            state = job.payload.state
            noisy = {n: t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in state.items()}
            defaults = {n: t + torch.rand(t.shape, generator=g) for n, t in job.payload.pg_defaults.items()}
            counts = torch.randint(0, 20, (NUM_EXPERTS,), generator=g).to(torch.float32)
            telemetry = {LAYER: {"expert_tokens": counts, "tokens": counts.sum() / 2}} if self.sparse else {}
            update = ClientUpdate(
                spec=job.spec,
                state=elsewhere(noisy),
                num_examples=10 + job.client_id,
                telemetry=elsewhere(telemetry),
                pg_defaults=elsewhere(defaults),
                train_loss=0.5,
                num_steps=2,
                train_seconds=0.01,
            )
            results.append(ClientResult(job.client_id, update, seconds=0.01))
        return results


@functools.cache
def settings_of(method: str) -> MethodSettings:
    # UB-SMoE with its router-side PG on (off by default), so PG default outputs travel too
    extra = ("method.pg.router=true",) if method == "ubsmoe" else ()
    return method_settings(compose_config(f"method={method}", *extra))


def server_settings_for(optimizer: str) -> ServerSettings:
    if optimizer == "fedavg":
        return ServerSettings()
    return ServerSettings(optimizer=optimizer, lr=0.1, momentum=0.9 if optimizer == "fedavgm" else 0.0)


def make_loop(method: str, optimizer: str, output_dir: Path) -> tuple[FederatedLoop, list[Any]]:
    settings = settings_of(method)
    module = FakeModule(settings)
    strategy = build_strategy(
        settings, StrategyContext(expert_tensor_names=module.expert_tensor_names(), lora_scaling=2.0, seed=0)
    )
    tier_specs = make_tier_specs(
        TIERS, sparse=settings.sparse, hetero_rank=settings.hetero_rank, num_experts=NUM_EXPERTS, max_rank=RANK,
        homogeneous_rank=settings.homogeneous_rank,
    )  # fmt: skip
    callbacks: list[Any] = [DMRCallback(settings.dmr, module.phi_names())]
    loop = FederatedLoop(
        fabric=FakeFabric(callbacks), module=module, data=FakeData(),  # type: ignore[arg-type]
        specs=make_client_specs(4, tier_specs),
        tier_specs=tier_specs, strategy=strategy, sampler=ClientSampler(4, 3, seed=0), callbacks=callbacks, seed=0,
        rounds=10, local_steps=2, local_epochs=None, eval_every=100, output_dir=output_dir, checkpoint=False,
        fingerprint={}, backend=ElsewhereBackend(settings.sparse), progress=False,
        server_optimizer=build_server_optimizer(
            server_settings_for(optimizer), strategy, frozen_names=module.phi_names(), method_name=method
        ),
    )  # fmt: skip
    return loop, callbacks


CASES = [(m, "fedavg") for m in names.METHODS] + [
    (m, o) for m in names.METHODS if STRATEGIES[m].supports_server_optimizer for o in SERVER_OPTIMIZERS if o != "fedavg"
]


@pytest.mark.parametrize(("method", "optimizer"), CASES)
def test_replies_from_another_device_are_received_onto_the_servers(method: str, optimizer: str, tmp_path: Path) -> None:
    loop, callbacks = make_loop(method, optimizer, tmp_path)
    loop.fabric.call("on_fit_start", loop=loop)
    before = loop.server.global_state
    with Progress(disable=True) as bar:
        task = bar.add_task("clients", total=3)
        for _ in range(2):
            summary = loop.run_round(bar, task, time.perf_counter())
    assert not summary.skipped and not summary.dropped
    server = loop.server
    assert set(server.global_state) == set(before)
    assert ordinary_cpu(server.global_state) and ordinary_cpu(server.pg_defaults) and ordinary_cpu(server.utilization)
    assert bool(server.pg_defaults) == (method == "ubsmoe")
    assert all(not torch.equal(server.global_state[n], before[n]) for n in before if n.endswith("head.weight"))
    assert ordinary_cpu([u.state for u in summary.updates]) and ordinary_cpu([u.telemetry for u in summary.updates])
    assert ordinary_cpu(callbacks[0].previous)
    assert ordinary_cpu(loop.server_optimizer.params) and ordinary_cpu(loop.strategy.state_dict())
    if settings_of(method).dmr.enabled and loop.module.sparse:
        assert not torch.equal(server.global_state[f"{LAYER}.phi"], before[f"{LAYER}.phi"])


def test_timings_record_each_tiers_training_cost(tmp_path: Path) -> None:
    """Per round and tier: clients, steps, seconds per step; peak memory null off CUDA."""
    loop, _ = make_loop("ubsmoe", "fedavg", tmp_path)
    loop.fabric.call("on_fit_start", loop=loop)
    with Progress(disable=True) as bar:
        summary = loop.run_round(bar, bar.add_task("clients", total=3), time.perf_counter())
    record = json.loads((tmp_path / "timings.jsonl").read_text().splitlines()[0])
    assert set(record["tiers"]) == {t.name for t in TIERS}
    assert "setup_seconds" not in record  # a loop built without its setup's cost records none
    assert sum(record["phases"].values()) == pytest.approx(record["round_seconds"], abs=1e-3)
    for index, tier in enumerate(TIERS):
        cost = record["tiers"][tier.name]
        members = [u for u in summary.updates if u.spec.tier_index == index]
        assert cost["clients"] == len(members) and cost["steps"] == 2 * len(members)
        assert cost["train_seconds_per_step"] == (pytest.approx(0.005) if members else None)
        assert cost["peak_memory_bytes"] is None


class RecordingModule(torch.nn.Module):
    """Records the tensors load_payload hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.received: list[torch.Tensor] = []

    def set_client(self, **kwargs: Any) -> None:
        del kwargs

    def set_base_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        self.received += list(deltas.values())

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.received += list(state.values())

    def set_pg_defaults(self, defaults: dict[str, torch.Tensor]) -> None:
        self.received += list(defaults.values())


def test_a_payload_is_moved_to_the_clients_device_where_it_is_loaded() -> None:
    payload = ClientPayload(
        state=elsewhere({"w": torch.ones(3)}),
        pg_defaults=elsewhere({"layer": torch.ones(2, 2)}),
        base_deltas=elsewhere({"m.base_delta": torch.ones(2, 2)}),
    )
    module = RecordingModule()
    load_payload(module, ClientSpec(0, TIERS[0], 0, None, None), payload)  # type: ignore[arg-type]
    assert len(module.received) == 3 and ordinary_cpu(module.received)
