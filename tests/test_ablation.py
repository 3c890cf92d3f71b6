"""`make ablation`: one switch changed at a time, tabulated with the gradient bias."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import PROJECT_ROOT

from ubsmoe.ablation import VARIANTS, main

FAST = ("model.moefy.calibration_examples=64", "data.max_eval_examples=32")


def test_every_variant_changes_exactly_what_its_name_says():
    assert VARIANTS["full"] == []
    for name, overrides in VARIANTS.items():
        if name != "full":
            assert overrides and all(o.startswith("method.") for o in overrides), name


def test_an_unknown_variant_is_refused_before_any_run(tmp_path, capsys):
    assert main(["--variants", "full,no_such", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no_such" in err and "no_dmr" in err
    assert not any(tmp_path.iterdir())


def test_ablation_on_a_tiny_budget(tmp_path, glue_dir):
    root = tmp_path / "ablation"
    env = {**os.environ, "GLUE_DIR": str(glue_dir), "WANDB_MODE": "offline", "PYTHONPATH": str(PROJECT_ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "ubsmoe.ablation", "--variants", "full,no_pg_expert", "--budget", "smoke",
         "--every", "1", "--root", str(root), "federation.rounds=1", "federation.local_steps=1",
         f"paths.cache_dir={tmp_path / 'cache'}", *FAST],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (root / "ablation.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 4  # header + variants x tiers
    md = (root / "ablation.md").read_text()
    assert "| full | `-` |" in md and "| no_pg_expert | `method.pg.expert=false` |" in md
    # the bias is measured on every tier: 0 at K = M, positive below
    t100 = [r for r in rows[1:] if ",t100," in r]
    assert all(",0.0,0.0" in r for r in t100), t100
    t25 = next(r for r in rows[1:] if r.startswith("full,") and ",t25," in r)
    assert float(t25.split(",")[-2]) > 0.0
