"""ubsmoe.plots: loading run directories, variants and tables, the figures, and the CLI's errors.

Run directories are written by the real :class:`MetricsWriter` from simulated rounds
(:func:`write_fake_run`), so the tests read exactly the schema a run writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from ubsmoe import plots
from ubsmoe.callbacks.metrics_writer import MetricsWriter
from ubsmoe.settings import Tier
from ubsmoe.fl.summary import RoundSummary, TierEvaluation

FOUR_TIERS = (Tier("t25", 0.25, 0.25), Tier("t50", 0.5, 0.25), Tier("t75", 0.75, 0.25), Tier("t100", 1.0, 0.25))
DENSE_METHODS = ("fedit", "hetlora", "flexlora", "flora")


def _route(gen: torch.Generator, bias: torch.Tensor, k: int, tokens: int) -> torch.Tensor:
    """Token counts per expert when ``tokens`` tokens pick their top-k of bias + Gumbel noise."""
    noise = -torch.log(-torch.log(torch.rand(tokens, bias.numel(), generator=gen).clamp(1e-9, 1 - 1e-9)))
    chosen = torch.topk(bias + noise, k, dim=1).indices
    return torch.bincount(chosen.flatten(), minlength=bias.numel()).double()


def write_fake_run(
    run_dir: Path,
    method: str,
    *,
    seed: int = 0,
    rounds: int = 3,
    num_layers: int = 6,
    num_experts: int = 8,
    eval_every: int = 1,
    tiers: tuple[Tier, ...] = FOUR_TIERS,
    overrides: list[str] | None = None,
) -> Path:
    """A run directory as a real run leaves it: metrics.jsonl and experts.jsonl from MetricsWriter,
    and Hydra's .hydra/overrides.yaml when ``overrides`` is given.

    Sparse methods route simulated tokens (top-K_c of biased noisy logits, the bias shrinking
    over rounds when DMR is on); dense methods have no experts, like the real ones.
    """
    gen = torch.Generator().manual_seed(seed)
    sparse = method not in DENSE_METHODS
    dmr = method in ("ubsmoe", "flame")
    layers = [f"encoder.layer.{i}" for i in range(num_layers)]
    ks = [max(1, math.floor(num_experts * t.beta + 1e-9)) for t in tiers]
    specs = [SimpleNamespace(k=k if sparse else None, rank=None if sparse else max(1, k)) for k in ks]
    loop = SimpleNamespace(
        tiers=list(tiers),
        tier_spec=lambda i: specs[i],
        tier_flops=lambda i: 1.0e9 * (0.4 + 0.6 * tiers[i].beta),
        dense_flops_per_example=1.0e9,
        fabric=SimpleNamespace(log_dict=lambda *args, **kwargs: None),
    )
    writer = MetricsWriter(run_dir, method=method, task="sst2", seed=seed)
    writer.on_fit_start(loop)
    biases = {layer: 2.0 * torch.randn(num_experts, generator=gen, dtype=torch.float64) for layer in layers}
    phi = {layer: torch.zeros(num_experts, dtype=torch.float64) for layer in layers}
    start = time.perf_counter()
    for r in range(1, rounds + 1):
        client_tiers = [int(i) for i in torch.randint(0, len(tiers), (4,), generator=gen)]
        updates = [
            SimpleNamespace(
                spec=SimpleNamespace(tier_index=i),
                train_loss=0.7 / r + 0.05 * float(torch.rand(1, generator=gen)),
                bytes_received=1000 * ks[i],
                bytes_sent=1000 * ks[i],
            )
            for i in client_tiers
        ]
        shrink = 1.0 / (1.0 + r) if dmr else 1.0
        utilization: dict[str, torch.Tensor] = {}
        if sparse:
            for layer in layers:
                counts = sum(_route(gen, biases[layer] * shrink, ks[i], 64) for i in client_tiers)
                utilization[layer] = (counts / (64 * len(client_tiers))).float()
                if dmr:
                    u = utilization[layer].double()
                    target = float(u.sum()) / num_experts
                    phi[layer] = (0.5 * phi[layer] + 0.5 * torch.tanh(target / (u + 1e-6) - 1)).clamp(-1, 1)
        evaluation = None
        if r % eval_every == 0 or r == rounds:
            evaluation = {}
            for i, tier in enumerate(tiers):
                acc = 0.5 + 0.35 * (1 - math.exp(-r / 2)) * (0.6 + 0.4 * tier.beta) + 0.01 * seed
                ev_util = (
                    {layer: _route(gen, biases[layer] * shrink, ks[i], 128) / 128 for layer in layers} if sparse else {}
                )
                evaluation[tier.name] = TierEvaluation(
                    tier=tier.name, beta=tier.beta, k=specs[i].k, rank=specs[i].rank,
                    metrics={"accuracy": acc, "loss": 1.0 - acc}, main_metric=acc,
                    flops_per_example=loop.tier_flops(i), utilization=ev_util,
                    max_load_fraction={layer: float(u.max() / u.sum()) for layer, u in ev_util.items()},
                )
        summary = RoundSummary(
            round=r, client_ids=list(range(4)), updates=updates, evaluation=evaluation,  # type: ignore[arg-type]
            utilization=utilization, phi={k: v.float() for k, v in phi.items()} if dmr else {},
            wall_time=time.perf_counter() - start, round_seconds=0.1, train_eval_seconds=0.1,
        )
        writer.on_round_end(loop, summary)
    if overrides is not None:
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run_dir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [write_fake_run(root / "ubsmoe", "ubsmoe", seed=1), write_fake_run(root / "smoe", "smoe", seed=2)]


def _lines(ax: Any) -> dict[str, Any]:
    return {line.get_label(): line for line in ax.get_lines()}


# ------------------------------------------------------------------------------------ loading
def test_load_metrics_reads_every_round_and_tier(two_runs: list[Path]) -> None:
    df = plots.load_metrics(two_runs[0])
    assert len(df) == 3 * 4
    assert list(df["round"].unique()) == [1, 2, 3]
    assert plots.tier_order(df) == ["t25", "t50", "t75", "t100"]
    assert (df["val_accuracy"] == df["main_metric"]).all()
    assert plots.main_metric_name(df) == "accuracy"
    assert set(df["run"]) == {str(two_runs[0])}
    records = plots.load_experts(two_runs[0])
    assert [r["round"] for r in records] == [1, 2, 3]
    assert len(records[0]["train_utilization"]) == 6 and len(records[0]["phi"]) == 6
    assert set(records[-1]["eval_utilization"]) == {"t25", "t50", "t75", "t100"}


def test_missing_and_malformed_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(plots.RunDirError, match=str(tmp_path / "metrics.jsonl")):
        plots.load_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\nnot json\n')
    with pytest.raises(plots.RunDirError, match="line 2"):
        plots.load_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(plots.RunDirError, match="no rounds yet"):
        plots.load_metrics(tmp_path)


def test_a_rewritten_round_keeps_its_last_record(tmp_path: Path) -> None:
    run = write_fake_run(tmp_path / "run", "ubsmoe", rounds=2)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    again = json.loads(lines[-1])
    again["main_metric"] = 0.123
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(again) + "\n")
    df = plots.load_metrics(run)
    assert len(df) == 2 * 4
    assert df[(df["round"] == 2) & (df["tier"] == again["tier"])]["main_metric"].item() == 0.123


def test_variants_come_from_differing_overrides_and_seeds_are_averaged(tmp_path: Path) -> None:
    common = ["experiment=glue_hetero", "logger=csv"]
    runs = [
        write_fake_run(tmp_path / "a", "ubsmoe", seed=0, overrides=[*common, "method.dmr.enabled=true", "seed=0"]),
        write_fake_run(tmp_path / "b", "ubsmoe", seed=1, overrides=[*common, "method.dmr.enabled=true", "seed=1"]),
        write_fake_run(tmp_path / "c", "ubsmoe", seed=0, overrides=[*common, "method.dmr.enabled=false", "seed=0"]),
    ]
    df = plots.load_runs(runs)
    assert sorted(df["variant"].unique()) == ["ubsmoe dmr.enabled=false", "ubsmoe dmr.enabled=true"]
    assert set(df["dmr.enabled"]) == {"true", "false"}
    table = plots.final_table(df)
    last = {r: plots.load_metrics(r).query("round == 3").set_index("tier")["main_metric"] for r in runs}
    on = (last[runs[0]] + last[runs[1]]) / 2
    assert table.loc["ubsmoe dmr.enabled=true", "t50"] == pytest.approx(on["t50"])
    # the mean column is the number run_experiment returns (mean over tiers), averaged over seeds
    assert table.loc["ubsmoe dmr.enabled=true", "mean"] == pytest.approx(on.mean())
    assert list(table.columns) == ["t25", "t50", "t75", "t100", "mean"]
    fig = plots.convergence_figure(df)
    lines = _lines(fig.axes[0])
    assert set(lines) == {"ubsmoe dmr.enabled=true", "ubsmoe dmr.enabled=false"}
    np.testing.assert_allclose(lines["ubsmoe dmr.enabled=true"].get_ydata()[-1], on["t25"])


def test_run_labels_are_unique_below_the_common_parent(tmp_path: Path) -> None:
    a, b = tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"
    assert plots.run_label(a, [a, b]) == "0" and plots.run_label(b, [a, b]) == "1"
    assert plots.run_label(a) == "0"


# ------------------------------------------------------------------------------------ figures
def test_convergence_has_one_line_per_method_and_tier(two_runs: list[Path]) -> None:
    df = plots.load_runs(two_runs)
    fig = plots.convergence_figure(df)
    visible = [ax for ax in fig.axes if ax.get_visible() and ax.get_lines()]
    assert [ax.get_title() for ax in visible] == ["t25 (beta=0.25)", "t50 (beta=0.5)", "t75 (beta=0.75)",
                                                   "t100 (beta=1)"]
    assert visible[0].get_ylabel() == "validation accuracy"
    for ax, tier in zip(visible, ["t25", "t50", "t75", "t100"], strict=True):
        lines = _lines(ax)
        assert set(lines) == {"ubsmoe", "smoe"}
        expected = df[(df["method"] == "smoe") & (df["tier"] == tier)]["main_metric"].to_numpy()
        np.testing.assert_allclose(lines["smoe"].get_ydata(), expected)
    assert plots.train_loss_figure(df) is not None
    assert plots.balance_figure(df) is not None


def test_unevaluated_rounds_are_left_out_of_convergence_but_not_of_the_loss(tmp_path: Path) -> None:
    run = write_fake_run(tmp_path / "r", "ubsmoe", rounds=3, eval_every=2)
    df = plots.load_runs([run])
    assert list(_lines(plots.convergence_figure(df).axes[0])["ubsmoe"].get_xdata()) == [2, 3]
    assert list(_lines(plots.train_loss_figure(df).axes[0])["ubsmoe"].get_xdata()) == [1, 2, 3]
    records = plots.load_experts(run)
    assert "round 3" in plots.heatmap_figure(records).get_suptitle()
    assert list(_lines(plots.utilization_figure(records, "t25").axes[0])["expert 0"].get_xdata()) == [2, 3]


def test_expert_figures_follow_the_records(two_runs: list[Path]) -> None:
    records = plots.load_experts(two_runs[0])
    assert plots.utilization_sources(records) == ["train", "t25", "t50", "t75", "t100"]
    fig = plots.utilization_figure(records, "train")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [f"layer {i}" for i in range(6)]
    lines = _lines(panels[2])
    assert len(lines) == 8 + 1  # every expert and the balanced share
    layer = "encoder.layer.2"
    np.testing.assert_allclose(lines["expert 5"].get_ydata(), [r["train_utilization"][layer][5] for r in records])
    t25 = plots.utilization_figure(records, "t25")
    # K_c = 2 of 8 experts: the balanced share is 2/8 of the tokens
    np.testing.assert_allclose(_lines(t25.axes[0])["balanced"].get_ydata(), 0.25, atol=1e-6)
    phi = _lines(plots.phi_figure(records).axes[0])
    np.testing.assert_allclose(phi["expert 0"].get_ydata(), [r["phi"]["encoder.layer.0"][0] for r in records])
    heat = plots.heatmap_figure(records)
    image = heat.axes[3].get_images()[0].get_array()
    assert image.shape == (6, 8)
    np.testing.assert_allclose(image, 1.0)  # t100 runs all 8 experts on every token
    # smoe has experts but no DMR: no phi figure, everything else
    smoe = plots.expert_figures(plots.load_experts(two_runs[1]))
    assert smoe["phi"] is None and smoe["heatmap"] is not None and smoe["utilization_train"] is not None


def test_dense_methods_skip_expert_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_fake_run(tmp_path / "fedit", "fedit")
    figures = plots.expert_figures(plots.load_experts(run))
    assert all(fig is None for fig in figures.values())
    assert plots.balance_figure(plots.load_runs([run])) is None
    assert plots.main([str(run)]) == 0
    written = sorted(p.name for p in (run / "plots").iterdir())
    assert written == ["convergence.png", "train_loss.png"]
    err = capsys.readouterr().err
    assert "skipped phi.png" in err and "dense method" in err


# ------------------------------------------------------------------------------------ CLI
def test_cli_writes_per_run_and_comparison_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two_tiers = (Tier("weak", 0.25, 0.5), Tier("strong", 1.0, 0.5))
    runs = [
        write_fake_run(tmp_path / "runs" / "ubsmoe", "ubsmoe", num_layers=2, tiers=two_tiers),
        write_fake_run(tmp_path / "runs" / "fedit", "fedit", tiers=two_tiers),
    ]
    out = tmp_path / "out"
    assert plots.main([*map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    comparison = {"convergence.png", "train_loss.png", "balance.png"}
    assert {p.name for p in out.glob("*.png")} == comparison
    assert {p.name for p in (out / "ubsmoe").glob("*.png")} == comparison | {
        "utilization_train.png", "utilization_weak.png", "utilization_strong.png", "phi.png", "heatmap.png"
    }
    assert {p.name for p in (out / "fedit").glob("*.png")} == {"convergence.png", "train_loss.png"}
    assert sorted(printed) == sorted(map(str, out.rglob("*.png")))
    assert all(Path(p).stat().st_size > 1000 for p in printed)
    # the comparison draws both methods, the balance only the one with experts
    df = plots.load_runs(runs)
    assert set(_lines(plots.convergence_figure(df).axes[0])) == {"ubsmoe", "fedit"}
    assert set(_lines(plots.balance_figure(df).axes[0])) == {"ubsmoe"}


def test_cli_skips_run_dirs_without_metrics_with_a_warning(tmp_path: Path, two_runs: list[Path],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    failed = tmp_path / "failed-run"  # a failed or dry run: a run directory without metrics.jsonl
    failed.mkdir()
    assert plots.main([str(two_runs[0]), str(failed), "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert f"skipping {failed}" in captured.err
    assert list((tmp_path / "o").glob("*.png"))  # the good run was plotted
    # nothing usable at all: exit 2, nothing written
    assert plots.main([str(failed), "--out", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


def test_round_axes_have_integer_ticks_and_the_seed_band_is_labelled(tmp_path: Path) -> None:
    runs = [write_fake_run(tmp_path / f"seed{s}", "ubsmoe", seed=s, rounds=3) for s in (1, 2)]
    fig = plots.convergence_figure(plots.load_runs(runs))
    ax = fig.axes[0]
    assert all(float(t).is_integer() for t in ax.get_xticks())
    labels = ax.get_legend_handles_labels()[1]
    assert any("min-max over 2 runs" in lab for lab in labels)


def test_multirun_job_dirs_are_named_by_their_overrides(tmp_path: Path) -> None:
    jobs = [
        write_fake_run(tmp_path / "multirun" / str(num), "ubsmoe", rounds=1,
                       overrides=[f"method.dmr.enabled={enabled}", "seed=1"])
        for num, enabled in ((0, "true"), (1, "false"))
    ]  # fmt: skip
    assert plots.run_label(jobs[0], jobs) == "0_dmr.enabled=true"
    assert plots.run_label(jobs[1], jobs) == "1_dmr.enabled=false"


# ------------------------------------------------------------------------------------ run dirs for notebooks
def test_notebook_run_dirs_explicit_then_env_then_newest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "logs" / "runs"
    old = write_fake_run(root / "sst2-smoe" / "day1", "smoe", rounds=1)
    new = write_fake_run(root / "sst2-ubsmoe" / "day2", "ubsmoe", rounds=1)
    os.utime(old / "metrics.jsonl", (1, 1))
    monkeypatch.delenv(plots.RUN_DIRS_ENV, raising=False)
    assert plots.resolve_run_dirs([], runs_root=root) == [new]
    monkeypatch.setenv(plots.RUN_DIRS_ENV, f"{old}{os.pathsep}{new}")
    assert plots.resolve_run_dirs([], runs_root=root) == [old, new]
    assert plots.resolve_run_dirs([str(old)], runs_root=root) == [old]
    with pytest.raises(plots.RunDirError, match="typo"):
        plots.resolve_run_dirs([tmp_path / "typo"])
    with pytest.raises(plots.RunDirError, match="UBSMOE_RUN_DIRS"):
        plots.newest_run_dir(tmp_path / "empty")
