"""Training-step speed of the MoEfied backbone at K = M/4, M/2, M against dense LoRA, on this CPU.

One run, side by side: for each dropout setting and sequence length, a training step
(forward, backward, PG hook, AdamW step) of

- ``dense``: the dense backbone with peft LoRA on the same matrices (attention query/value
  and both FFN matrices), i.e. what the dense baselines train;
- ``sparse``: the MoEfied backbone (UB-SMoE defaults: DMR, PG router and expert signals) at
  each K, with the sorted dispatch (K < M) or the dense path (K = M);
- ``masked_loop``: the same experts at K = M/4 dispatched the straightforward way (a Python
  loop over experts with boolean masks in autograd, as Hugging Face's eager Mixtral block).

Configurations are interleaved round by round (one step of each, repeated) so that load
from other processes on the shared CPU hits all of them alike; the figure is the median
step after warm-up. FLOPs are the analytic forward count per example (``smoe/flops.py``),
checked against ``FlopCounterMode`` with eager attention at a small batch.

A second pass times where a step goes: module hooks split forward and backward into
attention, FFN and the rest, and a profiled step splits it by operator (matrix products,
dropout's random numbers, everything else).

Allocator. PyTorch on CPU allocates every activation afresh; with glibc's defaults, freed
blocks of tens of MB go back to the OS and the next step page-faults them in again, at a
cost that depends on which configuration ran just before (dense steps at length 128 varied
by +-30% between runs). The script therefore re-executes itself with glibc told to keep
freed memory (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, recorded in the JSON);
``--no-malloc-tuning`` measures with the defaults. This speeds up the dense model (it has the
larger temporaries) more than the sparse one.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/smoe_speed.py`` (writes
``logs/bench/smoe_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torchmetrics

from ubsmoe.model import FederatedClassifier
from ubsmoe.settings import MethodSettings, ModelSettings

MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product")


def build(sparse: bool, dropout: float | None, num_experts: int) -> FederatedClassifier:
    model = ModelSettings(dropout=dropout, num_experts=num_experts)
    return FederatedClassifier(
        model=model, method=MethodSettings(sparse=sparse), num_labels=2,
        metrics=torchmetrics.MetricCollection({}), num_tiers=4, init_seed=0,
    )  # fmt: skip


def make_batch(batch_size: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-length random sentences (no padding: the sparse path gets no free skipped tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 29000, (batch_size, length), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }


class Config:
    """One timed configuration: a model, its client budget and dispatch, its own optimizer."""

    def __init__(self, name: str, model: FederatedClassifier, k: int | None, dispatch: str = "sorted") -> None:
        self.name, self.model, self.k, self.dispatch = name, model, k, dispatch
        self.optimizer = model.configure_optimizers()
        self.times: list[float] = []

    def activate(self) -> None:
        self.model.set_client(k=self.k)
        for block in self.model.blocks.values():
            block.dispatch = self.dispatch
        self.model.train()

    def step(self, batch: dict) -> float:
        self.activate()
        start = time.perf_counter()
        loss = self.model.training_step(batch, 0)
        loss.backward()
        self.model.on_after_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


class StepBreakdown:
    """Wall time of attention and FFN (forward and backward) inside one training step, via hooks.

    Backward spans run from the gradient of a part's output being ready to the gradient of
    its input being ready; the CPU autograd engine runs one node at a time, so nothing else
    runs inside those spans. Layer 0's input needs no gradient: its attention backward ends
    when ``backward()`` returns.
    """

    def __init__(self, model: FederatedClassifier) -> None:
        self.totals = {"attention_forward": 0.0, "attention_backward": 0.0, "ffn_forward": 0.0, "ffn_backward": 0.0}
        self._open: dict[str, float] = {}
        self._pending_end: list[str] = []
        self.handles = []
        for i, layer in enumerate(model.backbone.encoder.layer):
            self._hook_span(layer.attention, layer.attention, f"attention{i}", "attention")
            self._hook_span(layer.intermediate, layer.output.dense, f"ffn{i}", "ffn")

    def _hook_span(self, first: torch.nn.Module, last: torch.nn.Module, key: str, part: str) -> None:
        def pre(module, args):
            self._open[key + "f"] = time.perf_counter()
            x = args[0]
            if x.requires_grad:
                x.register_hook(lambda g: self._close(key + "b", part + "_backward"))
            else:
                self._pending_end.append(key + "b")

        def post(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            self.totals[part + "_forward"] += time.perf_counter() - self._open.pop(key + "f")
            if out.requires_grad:
                out.register_hook(lambda g: self._start(key + "b"))

        self.handles += [first.register_forward_pre_hook(pre), last.register_forward_hook(post)]

    def _start(self, key: str) -> None:
        self._open[key] = time.perf_counter()

    def _close(self, key: str, total: str) -> None:
        if key in self._open:
            self.totals[total] += time.perf_counter() - self._open.pop(key)

    def finish_backward(self) -> None:
        now = time.perf_counter()
        for key in self._pending_end:
            if key in self._open:
                part = "attention" if key.startswith("attention") else "ffn"
                self.totals[part + "_backward"] += now - self._open.pop(key)
        self._pending_end.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def time_breakdown(config: Config, batch: dict, steps: int) -> dict[str, float]:
    """Median over ``steps`` of each part of a step (seconds), hooks on."""
    config.activate()
    records = []
    for _ in range(steps):
        breakdown = StepBreakdown(config.model)
        start = time.perf_counter()
        loss = config.model.training_step(batch, 0)
        forward_end = time.perf_counter()
        loss.backward()
        breakdown.finish_backward()
        backward_end = time.perf_counter()
        config.model.on_after_backward()
        config.optimizer.step()
        config.optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        breakdown.remove()
        t = dict(breakdown.totals)
        t["total"] = end - start
        t["optimizer_and_pg"] = end - backward_end
        attention = t["attention_forward"] + t["attention_backward"]
        ffn = t["ffn_forward"] + t["ffn_backward"]
        t["attention"], t["ffn"] = attention, ffn
        t["rest"] = t["total"] - attention - ffn
        t["forward_total"] = forward_end - start
        records.append(t)
    return {key: statistics.median(r[key] for r in records) for key in records[0]}


def profile_ops(config: Config, batch: dict) -> dict[str, float]:
    """Share of one profiled step's operator self time: matrix products, dropout RNG, the rest."""
    from torch.profiler import ProfilerActivity, profile

    config.activate()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        config.step(batch)
    total = matmul = rng = 0.0
    for event in prof.key_averages():
        if event.key.startswith(("autograd::", "Optimizer.", "DenseExperts", "DispatchedExperts")):
            continue
        self_time = event.self_cpu_time_total
        total += self_time
        if event.key.startswith(MATMUL_OPS):
            matmul += self_time
        elif event.key in ("aten::bernoulli_", "aten::native_dropout"):
            rng += self_time
    return {"matmul_share": matmul / total, "dropout_rng_share": rng / total, "other_share": 1 - (matmul + rng) / total}


def run(args: argparse.Namespace) -> dict:
    m = args.num_experts
    ks = [m // 4, m // 2, m]
    results, breakdowns, flop_checks = [], [], []
    for dropout in args.dropouts:
        dropout_value = None if dropout == "default" else float(dropout)
        dense_model = build(False, dropout_value, m)
        sparse_model = build(True, dropout_value, m)
        configs = [Config("dense", dense_model, None)]
        configs += [Config(f"sparse_k{k}", sparse_model, k) for k in ks]
        configs.append(Config(f"masked_loop_k{ks[0]}", sparse_model, ks[0], dispatch="masked_loop"))
        for length in args.lengths:
            batch = make_batch(args.batch_size, length)
            for config in configs:
                config.times = []
            for round_ in range(args.warmup + args.steps):
                for config in configs:
                    seconds = config.step(batch)
                    if round_ >= args.warmup:
                        config.times.append(seconds)
            dense_flops = dense_model.flops_per_example(length)
            dense_seconds = statistics.median(configs[0].times)
            for config in configs:
                config.model.set_client(k=config.k)
                flops = config.model.flops_per_example(length)
                seconds = statistics.median(config.times)
                variant = "dense" if config.k is None else ("masked_loop" if config.dispatch == "masked_loop" else "sparse")
                results.append({
                    "k": config.k, "num_experts": m if config.k is not None else None, "seq_len": length,
                    "seconds": seconds, "time_ratio_to_dense": seconds / dense_seconds,
                    "flops_ratio_to_dense": flops / dense_flops, "variant": variant,
                    "dropout": "backbone default (0.1)" if dropout_value is None else dropout_value,
                    "batch_size": args.batch_size, "flops_per_example": flops,
                    "step_seconds": [round(t, 4) for t in config.times],
                })  # fmt: skip
                print(f"dropout={dropout} L={length} {config.name:16s} {seconds:.3f}s  "
                      f"time x{seconds / dense_seconds:.3f}  flops x{flops / dense_flops:.3f}", flush=True)
            # where the time goes: dense and K = M/4
            for config in (configs[0], configs[1]):
                parts = time_breakdown(config, batch, args.breakdown_steps)
                parts.update(profile_ops(config, batch))
                breakdowns.append({"variant": config.name, "seq_len": length, "dropout": dropout, **parts})
            # the analytic count against FlopCounterMode (eager attention, batch of 2)
            small = {k: v[:2] for k, v in batch.items() if k != "labels"}
            for config in configs[:-1]:
                config.model.set_client(k=config.k)
                measured = config.model.measured_flops_per_example(small)
                analytic = config.model.flops_per_example(length)
                flop_checks.append({"variant": config.name, "seq_len": length, "analytic": analytic,
                                    "measured": measured, "relative_error": abs(measured - analytic) / analytic})
            sparse_model.set_client()
    return {"results": results, "breakdown": breakdowns, "flops_check": flop_checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--breakdown-steps", type=int, default=3)
    parser.add_argument("--dropouts", nargs="+", default=["default", "0"], help="'default' keeps the backbone's")
    parser.add_argument("--out", type=Path, default=Path("logs/bench/smoe_speed.json"))
    parser.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's allocator defaults")
    args = parser.parse_args()
    if not args.no_malloc_tuning and any(os.environ.get(k) != v for k, v in MALLOC_TUNING.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_TUNING})
    started = time.time()
    load_before = os.getloadavg()
    out = run(args)
    out["meta"] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(), "wall_seconds": time.time() - started,
        "malloc_tuning": {k: os.environ.get(k) for k in MALLOC_TUNING},
        "flops": "analytic forward FLOPs per example (matrix products; attention counted as the eager kernel does)",
        "attention": "sdpa for timing; eager for FlopCounterMode checks (it does not count the CPU sdpa kernel)",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
