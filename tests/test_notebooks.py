"""The research workflow end to end: both notebooks and ``python -m ubsmoe.plots`` on run
directories, and the sweep files (W&B grids and the matching Hydra multirun lines).

Everything reads the run directories of the one fixture ``run_dirs``; swap it for a real
smoke run and the same checks hold.
"""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml
from hydra import compose, initialize_config_dir
from nbclient import NotebookClient
from omegaconf import OmegaConf

from ubsmoe import plots
from ubsmoe.validate import validate
from ubsmoe.names import METHODS

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CONFIGS = ROOT / "configs"
SWEEPS = ("ablation", "methods")
MIN_PNG_BYTES = 1000


@pytest.fixture(scope="module")
def run_dirs(smoke_runs: dict[str, Path]) -> list[Path]:
    """The run directories the workflow is checked on: the real smoke runs (UB-SMoE and FedIT)."""
    return [smoke_runs["ubsmoe"], smoke_runs["fedit"]]


# ------------------------------------------------------------------------------------ notebooks
def _png_outputs(nb: Any) -> list[bytes]:
    return [
        base64.b64decode(out["data"]["image/png"])
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if "image/png" in out.get("data", {})
    ]


@pytest.mark.parametrize("name", ["convergence.ipynb", "experts.ipynb"])
def test_notebooks_are_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "code" and "RUN_DIRS: list[str] = []" in first.source
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def _expected_images(name: str, run_dirs: list[Path]) -> int:
    """What the notebook must draw: every figure ubsmoe.plots has for these runs."""
    if name == "convergence.ipynb":
        figures = plots.comparison_figures(plots.load_runs(run_dirs))
        return sum(fig is not None for fig in figures.values())
    return sum(
        fig is not None for d in run_dirs for fig in plots.expert_figures(plots.load_experts(d)).values()
    )


@pytest.mark.parametrize("name", ["convergence.ipynb", "experts.ipynb"])
def test_notebook_executes_on_the_run_dirs(name: str, run_dirs: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    monkeypatch.setenv(plots.RUN_DIRS_ENV, os.pathsep.join(str(d) for d in run_dirs))  # the kernel inherits it
    NotebookClient(nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    printed = "".join(out.get("text", "") for cell in nb.cells for out in getattr(cell, "outputs", []))
    assert all(str(d) in printed for d in run_dirs)  # it read the directories it was pointed at
    images = _png_outputs(nb)
    assert len(images) == _expected_images(name, run_dirs) > 0
    assert all(png.startswith(b"\x89PNG") and len(png) > MIN_PNG_BYTES for png in images)


# ------------------------------------------------------------------------------------ plots command
def test_plots_command_writes_nonempty_pngs(run_dirs: list[Path]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ubsmoe.plots", *map(str, run_dirs)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = {Path(p) for p in proc.stdout.split()}
    df = plots.load_runs(run_dirs)
    expected = set()
    for d in run_dirs:
        figures = {**plots.comparison_figures(df[df["run"] == str(d)]), **plots.expert_figures(plots.load_experts(d))}
        expected |= {d / "plots" / f"{stem}.png" for stem, fig in figures.items() if fig is not None}
    parent = Path(os.path.commonpath([d.resolve() for d in run_dirs]))
    expected |= {parent / "plots" / f"{stem}.png" for stem in ("convergence", "train_loss", "balance")}
    assert written == expected
    for path in expected:
        assert path.stat().st_size > MIN_PNG_BYTES, path


def test_plots_command_rejects_a_directory_without_metrics(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ubsmoe.plots", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert str(tmp_path / "metrics.jsonl") in proc.stderr


# ------------------------------------------------------------------------------------ sweeps
def _sweep(name: str) -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / "sweeps" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_is_a_wandb_grid_of_valid_hydra_overrides(name: str) -> None:
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = _sweep(name)
    assert sweep["method"] == "grid"
    assert (ROOT / sweep["program"]).is_file()
    assert sweep["metric"] == {"name": "val/mean_main_metric", "goal": "maximize"}
    writer_source = (ROOT / "src" / "ubsmoe" / "callbacks" / "metrics_writer.py").read_text()
    assert f'"{sweep["metric"]["name"]}"' in writer_source  # the metric is one the run logs
    command = sweep["command"]
    assert command[:3] == ["${env}", "${interpreter}", "${program}"] and command[-1] == "${args_no_hyphens}"
    fixed = command[3:-1]
    assert all("=" in arg for arg in fixed)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for key, spec in sweep["parameters"].items():
            for value in spec["values"]:
                if key == "method" and not (CONFIGS / "method" / f"{value}.yaml").is_file():
                    continue  # a baseline whose config is still being written
                # exactly the text the W&B agent puts on the command line (True, 0.5, fedit)
                args = create_sweep_command_args({"args": {key: {"value": value}}})["args_no_hyphens"]
                cfg = compose("train", overrides=[*fixed, *args])
                validate(cfg)
                assert OmegaConf.select(cfg, "method.name" if key == "method" else key) == value


def test_method_sweep_covers_every_method() -> None:
    assert sorted(_sweep("methods")["parameters"]["method"]["values"]) == sorted(METHODS)


def _multirun_grids() -> list[dict[str, set[Any]]]:
    """The ``python src/train.py -m ...`` lines of docs/workflow.md, as key -> set of values."""
    text = (ROOT / "docs" / "workflow.md").read_text().replace("\\\n", " ")
    grids = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("python src/train.py -m experiment=glue_hetero"):
            tokens = shlex.split(line.split(" #")[0])[3:]
            grids.append({k: {yaml.safe_load(v) for v in vs.split(",")} for k, vs in (t.split("=", 1) for t in tokens)})
    return grids


@pytest.mark.parametrize("name", SWEEPS)
def test_documented_multirun_is_the_same_grid(name: str) -> None:
    sweep = _sweep(name)
    grid = {k: set(spec["values"]) for k, spec in sweep["parameters"].items()}
    grid |= {k: {yaml.safe_load(v)} for k, v in (a.split("=", 1) for a in sweep["command"][3:-1])}
    without_logger = {k: v for k, v in grid.items() if not k.startswith("logger")}
    documented = [{k: v for k, v in g.items() if not k.startswith("logger")} for g in _multirun_grids()]
    assert without_logger in documented
