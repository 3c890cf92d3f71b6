"""The evidence machinery: the gradient-bias diagnostic, centralized bounds, `make results`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import PROJECT_ROOT, build, compose_config, make_batch, run_train_cli

from ubsmoe.callbacks.grad_bias import gradient_bias
from ubsmoe.validate import validate
from ubsmoe.errors import ConfigError
from ubsmoe.fl.centralized import centralize
from ubsmoe.results import bootstrap_ci, overview_lines, summarize

FAST = ("model.moefy.calibration_examples=64", "data.max_eval_examples=32")
CONTRACT = {"round", "tier", "beta", "k", "rank", "method", "task", "seed", "evaluated", "metrics", "main_metric",
            "train_loss", "num_clients", "flops_per_example", "flops_ratio_to_dense", "expert_entropy", "expert_cv",
            "max_load_fraction", "bytes_sent", "bytes_received", "wall_time", "grad_bias", "grad_bias_pg"}  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ gradient bias
def test_gradient_bias_is_zero_at_k_equal_m_and_positive_below():
    module = build(sparse=True)
    batch = make_batch()
    full = gradient_bias(module, batch, 8)
    assert full == {"grad_bias": 0.0, "grad_bias_pg": 0.0}
    sparse = gradient_bias(module, batch, 2)
    assert sparse["grad_bias"] > 0.01 and sparse["grad_bias_pg"] > 0.0
    assert sparse["grad_bias_pg"] < sparse["grad_bias"]  # PG's direction supplies part of what routing drops
    assert gradient_bias(module, batch, 2) == sparse  # fixed probe, same dropout masks: reproducible


def test_grad_bias_without_pg_is_the_same_with_the_router_side_pg_on():
    """The router-side PG's signal would reach the expert LoRA of earlier layers: it is off while measuring."""
    import torch

    from ubsmoe.settings import MethodSettings

    batch = make_batch()
    results = []
    for router in (False, True):
        method = MethodSettings()
        method.pg.router = router
        module = build(sparse=True, method=method)
        if router:  # non-zero default outputs, so the router signal has a gradient to give
            g = torch.Generator().manual_seed(1)
            module.set_pg_defaults({name: torch.randn(d.shape, generator=g) for name, d in module.pg_defaults().items()})
        before = {name: d.clone() for name, d in module.pg_defaults().items()}
        results.append(gradient_bias(module, batch, 2))
        assert all(torch.equal(d, before[name]) for name, d in module.pg_defaults().items())  # defaults given back
        assert all(block.options.pg_router is router for block in module.blocks.values())  # switch given back
    assert results[0] == results[1]


def test_grad_bias_runs_on_a_native_decoder_with_instruction_data(tmp_path):
    """experiment=commonsense_tiny: a native OLMoE-style decoder on LLM-Adapters' instruction data.

    The reference is the model's K_max experts (a native block cannot run all E), so the
    full-budget tier measures 0; the probes carry the response-only labels.
    """
    from ubsmoe.runner import run_experiment

    out = tmp_path / "run"
    run_experiment(compose_config(
        "experiment=commonsense_tiny", "diagnostics.every=1", "federation.rounds=1", "federation.num_clients=4",
        "federation.clients_per_round=2", "data.max_train_examples=64", "data.max_eval_examples=2",
        "data.max_length=160", "data.eval_mode=likelihood", "model.k_max=4", "method.pg.router=true",
        "logger=none", f"paths.output_dir={out}",
    ))  # fmt: skip
    records = {r["tier"]: r for r in _records(out)}
    assert [records[t]["k"] for t in ("t25", "t50", "t75", "t100")] == [1, 2, 3, 4]
    assert records["t100"]["grad_bias"] == 0.0 and records["t100"]["grad_bias_pg"] == 0.0
    for tier in ("t25", "t50", "t75"):
        assert records[tier]["grad_bias"] > 0.0 and records[tier]["grad_bias_pg"] >= 0.0
        assert records[tier]["grad_bias_pg"] <= records[tier]["grad_bias"]


def test_pg_completion_takes_the_best_non_negative_scale_per_expert():
    import torch

    from ubsmoe.callbacks.grad_bias import _best_completion

    direction = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]], [[1.0, 1.0]]], dtype=torch.float64)
    missing = torch.tensor([[[3.0, 0.0]], [[0.0, -1.0]], [[1.0, 0.0]]], dtype=torch.float64)
    left = _best_completion(missing, direction)
    # expert 0: exactly along the direction; expert 1: opposite, so PG cannot help (a = 0);
    # expert 2: the projection (a = 0.5) leaves the orthogonal part
    assert torch.allclose(left, torch.tensor([[0.0, 0.0], [0.0, -1.0], [0.5, -0.5]], dtype=torch.float64))


def test_gradient_bias_on_the_smoke_setting(tmp_path, glue_dir):
    out = tmp_path / "run"
    proc = run_train_cli("experiment=smoke", "federation.rounds=1", "diagnostics.every=1", f"paths.output_dir={out}",
                         f"paths.cache_dir={tmp_path / 'cache'}", *FAST, glue_dir=glue_dir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["tier"]: r for r in _records(out)}
    assert set(records["t25"]) >= CONTRACT
    assert records["t100"]["grad_bias"] == 0.0 and records["t100"]["grad_bias_pg"] == 0.0
    for tier in ("t25", "t50", "t75"):
        assert records[tier]["grad_bias"] > 0.0 and records[tier]["grad_bias_pg"] > 0.0
    # smaller K, larger bias (M - K_c experts missing)
    assert records["t25"]["grad_bias"] > records["t75"]["grad_bias"]


# ------------------------------------------------------------------------------ centralized
def test_centralized_config_matches_the_federated_budget():
    cfg = compose_config("experiment=compare", "federation=centralized", "federation.tier=t50")
    tiers = validate(cfg)
    cfg, tiers = centralize(cfg, tiers)
    assert [(t.name, t.beta, t.share) for t in tiers] == [("t50", 0.5, 1.0)]
    f = cfg.federation
    assert (f.num_clients, f.clients_per_round, f.local_steps, f.rounds) == (1, 1, 10 * 8, 6)
    with pytest.raises(ConfigError) as err:
        validate(compose_config("experiment=compare", "federation=centralized"))
    assert err.value.key == "federation.tier"
    with pytest.raises(ConfigError):
        validate(compose_config("experiment=compare", "federation=centralized", "federation.tier=t10"))
    federated = compose_config("experiment=compare")
    assert centralize(federated, validate(federated))[0].federation.num_clients == 20


def test_centralized_runs_end_to_end(tmp_path, glue_dir):
    out = tmp_path / "run"
    proc = run_train_cli("experiment=smoke", "federation=centralized", "federation.tier=t25", "diagnostics.every=1",
                         f"paths.output_dir={out}", f"paths.cache_dir={tmp_path / 'cache'}", *FAST, glue_dir=glue_dir)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(out)
    assert [(r["round"], r["tier"], r["k"], r["num_clients"]) for r in records] == [(1, "t25", 2, 1), (2, "t25", 2, 1)]
    assert all(set(r) >= CONTRACT for r in records)
    assert records[-1]["evaluated"] and 0.0 <= records[-1]["main_metric"] <= 1.0
    assert records[-1]["grad_bias"] > 0.0


# ------------------------------------------------------------------------------ make results
def test_bootstrap_and_summary_tables():
    low, high = bootstrap_ci(np.array([0.02, 0.03, 0.04]))
    assert 0.02 <= low < high <= 0.04
    low, high = bootstrap_ci(np.array([-0.05, 0.01, 0.04]))
    assert low < 0 < high
    rows = [{"method": m, "seed": s, "tier": "t25", "main_metric": v, "flops_per_example": 1e9, "flops_ratio_to_dense": 0.5,
             "bytes_down_per_client_round": 100, "bytes_up_per_client_round": 50}
            for m, vals in (("ubsmoe", (0.80, 0.82)), ("fedit", (0.70, 0.71))) for s, v in zip((1, 2), vals)]  # fmt: skip
    summary = summarize(rows)["t25"]
    assert summary["stats"]["ubsmoe"]["mean"] == pytest.approx(0.81)
    assert summary["stats"]["ubsmoe"]["std"] == pytest.approx(np.std([0.80, 0.82], ddof=1))
    diff = summary["differences"]["fedit"]
    assert diff["mean"] == pytest.approx(0.105) and not diff["inside_noise"] and diff["n"] == 2
    one_seed = summarize([r for r in rows if r["seed"] == 1])["t25"]["differences"]["fedit"]
    assert one_seed["n"] == 1 and one_seed["inside_noise"]  # a single pair is no interval: never marked
    one = overview_lines(summarize([r for r in rows if r["seed"] == 1]))
    assert "| ubsmoe | 0.8000 |" in one and " ± " not in "\n".join(one)  # one seed: no spread to show


def test_results_on_a_tiny_budget(tmp_path, glue_dir):
    root = tmp_path / "results"
    env = {**os.environ, "GLUE_DIR": str(glue_dir), "WANDB_MODE": "offline", "PYTHONPATH": str(PROJECT_ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "ubsmoe.results", "--seeds", "1,2", "--methods", "ubsmoe,fedit", "--budget", "smoke",
         "--root", str(root), "federation.rounds=1", "federation.local_steps=1", f"paths.cache_dir={tmp_path / 'cache'}",
         *FAST],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (root / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 * 4  # header + methods x seeds x tiers
    header = lines[0].split(",")
    assert header[-2:] == ["bytes_down_per_client_round", "bytes_up_per_client_round"]
    csv_rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert all(int(r["bytes_down_per_client_round"]) > 0 and int(r["bytes_up_per_client_round"]) > 0 for r in csv_rows)
    md = (root / "results.md").read_text()
    for tier in ("t25", "t50", "t75", "t100"):
        assert f"## tier {tier}" in md
    assert (root / "accuracy_vs_flops.png").stat().st_size > 1000  # one figure for every tier
    assert "| fedit | " in md and "bootstrap interval" in md and "down / client-round (MB)" in md
    overview = md.split("## tier")[0]  # the summaries come first: a row per method, a column per tier
    accuracy, cost = overview.split("Cost per tier")
    assert "| method | t25 | t50 | t75 | t100 |" in accuracy and "| method | t25 | t50 | t75 | t100 |" in cost
    rows = [line for line in accuracy.splitlines() if line.startswith(("| ubsmoe |", "| fedit |"))]
    assert len(rows) == 2 and all(line.count(" ± ") == 4 for line in rows)
    costs = {line.split(" | ")[0][2:]: line for line in cost.splitlines() if line.startswith(("| ubsmoe |", "| fedit |"))}
    assert costs["fedit"].count("1.00 · ") == 4 and costs["ubsmoe"].count(" · ") == 4
    assert float(costs["ubsmoe"].split(" | ")[1].split(" · ")[0]) < 0.6  # t25, K = 2 of 8: about half the FLOPs
    # an interrupted call is continued on the same root: finished runs are kept, not retrained
    again = subprocess.run(proc.args, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("is complete: kept") == 4 and "src/train.py" not in again.stdout
    assert (root / "results.csv").read_text().splitlines() == lines


def test_traffic_per_client_divides_each_tiers_bytes_by_its_trained_client_rounds():
    from ubsmoe.results import traffic_per_client

    records = [
        {"round": 1, "tier": "t25", "bytes_sent": 300, "bytes_received": 90, "num_clients": 3},
        {"round": 1, "tier": "t100", "bytes_sent": 50, "bytes_received": 0, "num_clients": 0},  # broadcast only
        {"round": 2, "tier": "t25", "bytes_sent": 100, "bytes_received": 30, "num_clients": 1},
        {"round": 2, "tier": "t100", "bytes_sent": 250, "bytes_received": 120, "num_clients": 2},
    ]  # fmt: skip
    assert traffic_per_client(records) == {"t25": (100.0, 30.0), "t100": (150.0, 60.0)}


def test_analysis_leaves_out_runs_that_have_not_finished(tmp_path, capsys):
    from ubsmoe.compare import FINISHED
    from ubsmoe.results import find_runs

    record = {"round": 6, "tier": "t25", "evaluated": True, "main_metric": 0.7}
    for method, seed, done in (("ubsmoe", 42, True), ("fedit", 42, True), ("fedit", 43, False)):
        run = tmp_path / "runs" / method / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        if done:
            (run / FINISHED).write_text("")
    assert sorted(find_runs(tmp_path)) == [("fedit", 42), ("ubsmoe", 42)]
    assert "runs/fedit/seed43 has not finished: left out" in capsys.readouterr().out


def test_comparison_table_shows_centralized_rows(tmp_path):
    from ubsmoe.compare import CENTRALIZED, CENTRALIZED_DENSE, comparison_rows, merge_runs

    def run(name, tiers, value):
        out = tmp_path / name
        out.mkdir(parents=True)
        records = [{"round": 2, "tier": t, "beta": b, "evaluated": True, "main_metric": value + b,
                    "flops_ratio_to_dense": b} for t, b in tiers]  # fmt: skip
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return out

    tiers = [("t25", 0.25), ("t100", 1.0)]
    dirs = {"ubsmoe": run("ubsmoe", tiers, 0.5),
            CENTRALIZED: merge_runs([run("c25", tiers[:1], 0.6), run("c100", tiers[1:], 0.6)], tmp_path / "c"),
            CENTRALIZED_DENSE: run("dense", tiers[1:], 0.0)}  # fmt: skip
    names, rows = comparison_rows(dirs)
    by = {r["method"]: r for r in rows}
    assert names == ["t25", "t100"]
    assert by[CENTRALIZED]["t25"] == pytest.approx(0.85) and by[CENTRALIZED]["t100"] == pytest.approx(1.6)
    assert by[CENTRALIZED_DENSE]["t25"] == by[CENTRALIZED_DENSE]["t100"] == pytest.approx(1.0)


def test_grad_bias_figure_draws_pg_off_and_on_per_tier():
    import pandas as pd

    from ubsmoe import plots

    rows = [{"round": r, "tier": t, "beta": b, "method": "ubsmoe", "main_metric": None, "train_loss": 0.5,
             "grad_bias": g * r, "grad_bias_pg": 0.8 * g * r, "metrics": None}
            for r in (1, 2) for t, b, g in (("t25", 0.25, 0.4), ("t100", 1.0, 0.0))]  # fmt: skip
    fig = plots.grad_bias_figure(pd.DataFrame(rows))
    assert fig is not None and len([ax for ax in fig.axes if ax.get_visible()]) == 2
    labels = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
    assert labels == {"ubsmoe (PG off)": [0.4, 0.8], "ubsmoe (PG on)": pytest.approx([0.32, 0.64])}
    assert plots.grad_bias_figure(pd.DataFrame(rows).drop(columns=["grad_bias", "grad_bias_pg"])) is None
