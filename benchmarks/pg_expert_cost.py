"""Cost of the PG expert signal's missed-token sums, against the experts' own work.

1. The sums alone (`accumulate_missed_tokens`) for one layer at MiniLM's sizes (M = 8,
   r = 8, h = 384, d_e = 192) and 4,096 assignments (batch 32 x 64 tokens x K = 2), against
   the six expert matrix products (forward and backward) of the same assignments.
2. Whole training steps of MiniLM at K = 2 with the expert PG off, `shared_mean` and
   `missed_tokens`, interleaved, medians after warm-up.

One torch thread. Usage: PYTHONPATH=src:tests python benchmarks/pg_expert_cost.py [--steps N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ubsmoe.smoe.pseudo_grad import MissedTokenSink, accumulate_missed_tokens


def sink_vs_experts(repeats: int = 15) -> tuple[float, float]:
    a, m, r, h, de = 4096, 8, 8, 384, 192
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    n = a // 2  # K = 2: two assignments a token
    tokens = torch.arange(n).repeat_interleave(2)
    args = dict(x=t(n, h), dy=t(n, h), dz=t(a, de), xa=t(a, r), t1=t(a, r), u=t(a, de), t2=t(a, r), ua=t(a, r))
    q = torch.rand(n, m, generator=g)
    w = t(de, h)
    xs = t(a, h)
    sink_times, expert_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        accumulate_missed_tokens(MissedTokenSink(), q, tokens, scaling=2.0, **args)
        sink_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(6):
            xs @ w.t()
        expert_times.append(time.perf_counter() - t0)
    return statistics.median(sink_times[3:]), statistics.median(expert_times[3:])


def step_times(steps: int) -> dict[str, float]:
    from helpers import build

    from ubsmoe.settings import MethodSettings

    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (32, 64), generator=g),
        "attention_mask": torch.ones(32, 64, dtype=torch.long),
        "token_type_ids": torch.zeros(32, 64, dtype=torch.long),
        "labels": torch.arange(32) % 2,
    }
    models = {}
    for mode in ("off", "shared_mean", "missed_tokens"):
        method = MethodSettings()
        method.pg.expert = mode != "off"
        if mode != "off":
            method.pg.expert_mode = mode
        model = build(method=method)
        model.set_client(k=2)
        model.train()
        models[mode] = (model, model.configure_optimizers())
    times: dict[str, list[float]] = {mode: [] for mode in models}
    for rep in range(steps + 2):
        for mode, (model, opt) in models.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            model.training_step(batch, 0).backward()
            model.on_after_backward()
            opt.step()
            if rep >= 2:
                times[mode].append(time.perf_counter() - t0)
    return {mode: statistics.median(ts) for mode, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sink, experts = sink_vs_experts()
    print(f"missed-token sums {sink * 1e3:.1f} ms per layer; expert products {experts * 1e3:.1f} ms; ratio {sink / experts:.3f}")
    medians = step_times(args.steps)
    for mode, value in medians.items():
        print(f"step, expert PG {mode:13s} {value:.3f} s  ratio to off {value / medians['off']:.3f}")


if __name__ == "__main__":
    main()
