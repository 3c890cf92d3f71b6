"""On a CUDA GPU: every method in bf16, and a paper-shaped UB-SMoE run on an OLMoE-1B-7B-shaped model.

Skipped without CUDA. ``scripts/gpu_check.sh`` runs this file (docs/gpu.md). Two checks:

- every method of :data:`ubsmoe.names.METHODS` on ``experiment=commonsense_tiny fabric=gpu``
  (bf16-mixed) for two short rounds: it finishes, its metrics are finite and the model ran
  on the GPU;
- UB-SMoE on a random model with OLMoE-1B-7B-0125's architecture (all 16 layers, 64 experts,
  top-8; :mod:`ubsmoe.backbones.random_checkpoint`, ``model.pretrained=false``, bf16 weights),
  Commonsense batches of 16 x 256 tokens, one round in which one client of each of the four
  tiers (K = 2 / 4 / 6 / 8) trains 4 local steps: it finishes with finite losses and metrics,
  and the peak GPU memory of each tier's training is recorded next to the estimate of
  :func:`ubsmoe.backbones.memory.estimate_memory` (one client per tier rather than the
  federation's usual handful per round, so that every tier is measured in one round).

With ``UBSMOE_GPU_REPORT=path.json`` the measurements are written there (merged, one key
per check) before anything is asserted, so a failing check still leaves its numbers.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import compose_config

from ubsmoe.backbones.memory import GiB, estimate_memory
from ubsmoe.backbones.random_checkpoint import ARCHITECTURES, architecture_config, write_random_checkpoint
from ubsmoe.fl.backends import LocalBackend
from ubsmoe.names import METHODS
from ubsmoe.runner import run_experiment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TIER_KS = {"t25": 2, "t50": 4, "t75": 6, "t100": 8}  # OLMoE's top-8 scaled by beta
BATCH, LENGTH, LOCAL_STEPS = 16, 256, 4
# commonsense_tiny on the GPU, as small as still exercises aggregation: 2 rounds of 2 clients.
TINY = (
    "experiment=commonsense_tiny", "fabric=gpu", "logger=none", "callbacks.checkpoint=false",
    "federation.num_clients=4", "federation.clients_per_round=2", "federation.rounds=2", "federation.local_steps=2",
    "federation.eval_every=2", "data.max_train_examples=64", "data.max_eval_examples=2", "data.max_length=160",
    "data.eval_mode=likelihood", "data.eval_benchmarks=[boolq,piqa,ARC-Easy]", "model.k_max=4",
)  # fmt: skip


def record(key: str, value: Any) -> None:
    """Merge ``{key: value}`` into the JSON file at $UBSMOE_GPU_REPORT (nothing when unset)."""
    path = os.environ.get("UBSMOE_GPU_REPORT")
    if not path:
        return
    report = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    report.setdefault("device", torch.cuda.get_device_name())
    report.setdefault("torch", torch.__version__)
    report[key] = value
    Path(path).write_text(json.dumps(report, indent=2, sort_keys=True))


def read_records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_finite_run(out: Path, result: float | None, rounds: int) -> list[dict[str, Any]]:
    """Every tier evaluated in the last round; finite metrics and losses; no client dropped."""
    records = read_records(out)
    last = [r for r in records if r["round"] == rounds]
    assert sorted(r["tier"] for r in last) == sorted(TIER_KS)
    assert result is not None and math.isfinite(result)
    assert all(r["evaluated"] for r in last)
    for r in records:
        if r["evaluated"]:
            assert all(math.isfinite(v) for v in r["metrics"].values()), r["metrics"]
        assert r["train_loss"] is None or math.isfinite(r["train_loss"])
        assert r["dropped_clients"] == 0 and not r["skipped"], r
    assert any(r["train_loss"] is not None for r in records)
    return records


def gib(n: float) -> float:
    return round(n / GiB, 3)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_the_gpu_in_bf16(tmp_path: Path, method: str) -> None:
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = run_experiment(compose_config(*TINY, f"method={method}", f"paths.output_dir={tmp_path}"))
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    record(f"tiny_{method}", {"seconds": round(seconds, 1), "peak_allocated_gib": gib(peak), "result": result})
    assert_finite_run(tmp_path, result, rounds=2)
    assert peak > 0  # the model and batches lived on the GPU


@pytest.mark.parametrize("method", ["ubsmoe", "flame", "florist", "hetlora"])
def test_server_state_on_the_gpu(tmp_path: Path, method: str) -> None:
    """``server.device=cuda``: the global state, phi, PG defaults and strategy state live on the GPU."""
    result = run_experiment(
        compose_config(*TINY, f"method={method}", "server.device=cuda", f"paths.output_dir={tmp_path}")
    )
    record(f"server_on_gpu_{method}", {"result": result})
    assert_finite_run(tmp_path, result, rounds=2)


class PeakMemoryBackend(LocalBackend):
    """The local backend, one client at a time, with the peak GPU memory of each client's training by tier."""

    def __init__(self) -> None:
        super().__init__()
        self.peaks: dict[str, dict[str, float]] = {}
        self.client_seconds: dict[str, float] = {}
        self.started_at: float | None = None

    def start(self, loop: Any) -> None:
        super().start(loop)
        self.started_at = time.perf_counter()  # the model is built and on the GPU by now

    def train_clients(self, jobs, on_done=None):
        results = []
        for job in jobs:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            results.extend(super().train_clients([job], on_done))
            torch.cuda.synchronize()
            tier = job.spec.tier.name
            self.client_seconds[tier] = round(time.perf_counter() - t0, 2)
            self.peaks[tier] = {
                "k": job.spec.k,
                "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()),
                "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()),
            }
            record("olmoe_1b_7b_tiers_so_far", self.peaks)  # kept if the run is cut short
        return sorted(results, key=lambda r: r.client_id)


def test_paper_shaped_ubsmoe_round_on_olmoe_1b_7b_shapes(tmp_path: Path) -> None:
    folder = write_random_checkpoint("olmoe-1b-7b", tmp_path / "olmoe-1b-7b")
    out = tmp_path / "run"
    cfg = compose_config(
        "experiment=commonsense_olmoe", f"model.backbone={folder}", "model.pretrained=false", "model.dtype=bfloat16",
        "fabric=gpu", "logger=none", "callbacks.checkpoint=false", "data.train_source=local",
        "data.eval_benchmarks=[boolq,piqa]", "data.eval_mode=likelihood", "data.max_eval_examples=16",
        f"data.batch_size={BATCH}", f"data.max_length={LENGTH}", "data.max_train_examples=1024",
        "federation.num_clients=4", "federation.clients_per_round=4", "federation.rounds=1",
        f"federation.local_steps={LOCAL_STEPS}", "federation.eval_every=1", "federation.min_client_size=16",
        f"paths.output_dir={out}",
    )  # fmt: skip
    backend = PeakMemoryBackend()
    start = time.perf_counter()
    result = run_experiment(cfg, backend=backend)
    total = time.perf_counter() - start
    config = architecture_config("olmoe-1b-7b")
    rank = int(cfg.model.lora.rank)
    tiers = {}
    for tier, peak in backend.peaks.items():
        estimate = estimate_memory(config, k=peak["k"], lora_rank=rank).total_bytes(BATCH * LENGTH)
        tiers[tier] = {**peak, "estimate_gib": gib(estimate), "client_seconds": backend.client_seconds[tier]}
    record(
        "olmoe_1b_7b_ubsmoe",
        {
            "model": f"random, {ARCHITECTURES['olmoe-1b-7b']['source']} architecture, bf16 weights, bf16-mixed",
            "step_tokens": f"{BATCH} x {LENGTH}", "local_steps": LOCAL_STEPS, "lora_rank": rank,
            "build_seconds": round(backend.started_at - start, 1) if backend.started_at else None,
            "total_seconds": round(total, 1), "tiers": tiers, "result": result,
        },
    )  # fmt: skip
    records = assert_finite_run(out, result, rounds=1)
    assert {r["tier"]: r["k"] for r in records} == TIER_KS
    assert all(r["train_loss"] is not None and r["train_loss"] > 0 for r in records)  # every tier trained
    assert sorted(backend.peaks) == sorted(TIER_KS)
    # Fewer active experts keep fewer activations: K = 2 peaks below K = 8.
    assert backend.peaks["t25"]["peak_allocated_gib"] < backend.peaks["t100"]["peak_allocated_gib"]
