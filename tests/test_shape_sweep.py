"""`python -m ubsmoe.shape_sweep`: one finished run's global model at every K."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ubsmoe.shape_sweep import main

pytestmark = pytest.mark.slow


def _final_records(run_dir: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(r["round"] for r in records)
    return {r["tier"]: r for r in records if r["round"] == last}


def test_the_sweep_reproduces_every_tiers_final_evaluation(smoke_runs, tmp_path, capsys):
    """At each tier's K the sweep is that tier's row of metrics.jsonl, metric and FLOPs; it adds the other K."""
    run_dir = smoke_runs["ubsmoe"]
    out = tmp_path / "sweep.json"
    assert main([str(run_dir), "--out", str(out)]) == 0
    rows = {row["k"]: row for row in json.loads(out.read_text())}
    assert sorted(rows) == list(range(1, 9))
    assert {row["tier"] for row in rows.values()} == {"t100"}
    for tier, record in _final_records(run_dir).items():
        row = rows[record["k"]]
        assert row["main_metric"] == record["main_metric"], tier
        assert row["metrics"] == pytest.approx(record["metrics"], rel=1e-12), tier
        assert row["flops_ratio_to_dense"] == pytest.approx(record["flops_ratio_to_dense"], abs=1e-6), tier
    assert all(len(r["predicted_shares"]) == 2 and sum(r["predicted_shares"]) == pytest.approx(1.0) for r in rows.values())
    ratios = [rows[k]["flops_ratio_to_dense"] for k in range(1, 9)]
    assert ratios == sorted(ratios) and ratios[0] < 0.5  # fewer experts, fewer FLOPs
    assert "| 8 |" in capsys.readouterr().out


def test_a_dense_run_or_an_unknown_tier_is_refused(smoke_runs, tmp_path, capsys):
    assert main([str(smoke_runs["fedit"]), "--out", str(tmp_path / "x.json")]) == 2
    assert "run_dir" in capsys.readouterr().err
    assert main([str(smoke_runs["ubsmoe"]), "--tier", "t10", "--out", str(tmp_path / "y.json")]) == 2
    err = capsys.readouterr().err
    assert "--tier" in err and "t25, t50, t75, t100" in err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()


def test_a_run_saved_before_a_later_key_is_rebuilt_as_it_ran(smoke_runs, tmp_path):
    """A saved config without a key added later gets the value the run had, not today's default."""
    import shutil

    from omegaconf import OmegaConf

    from ubsmoe.finished_run import LATER_KEYS, load_finished_run

    run_dir = tmp_path / "old_run"
    shutil.copytree(smoke_runs["ubsmoe"] / ".hydra", run_dir / ".hydra")
    shutil.copytree(smoke_runs["ubsmoe"] / "checkpoints", run_dir / "checkpoints")
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert cfg.data.eval_sort_by_length is True  # today's default
    del cfg.data["eval_sort_by_length"]
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    assert LATER_KEYS["data.eval_sort_by_length"] is False
    assert load_finished_run(run_dir).cfg.data.eval_sort_by_length is False
