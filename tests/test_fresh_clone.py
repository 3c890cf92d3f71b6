"""A clone of the repository alone, with nothing beside it, trains and verifies its data offline.

The clone is the files git tracks, copied into an empty temporary folder (no ../shared);
the already-built virtual environment is linked in so the test does not reinstall torch,
and make is told not to rebuild it (``-o``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT

VENV = PROJECT_ROOT / ".venv"


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fresh") / "ubsmoe"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT_ROOT, check=True,
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    for name in files:
        source = PROJECT_ROOT / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(source.read_bytes())
    assert not (root.parent / "shared").exists()
    return root


def _make(clone: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not (clone / ".venv").exists():
        (clone / ".venv").symlink_to(VENV)
    env = {k: v for k, v in os.environ.items() if k not in ("GLUE_DIR", "PROJECT_ROOT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(clone / "src"))
    return subprocess.run(["make", "-o", ".venv/.installed", *args], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason="needs the project's .venv (make install)")
def test_make_train_runs_from_a_clone_alone(clone: Path) -> None:
    proc = _make(clone, "train", "ARGS=experiment=smoke paths.output_dir=logs/runs/fresh")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (clone / "logs/runs/fresh/metrics.jsonl").read_text().splitlines()]
    assert {r["tier"] for r in records} == {"t25", "t50", "t75", "t100"}


@pytest.mark.slow
@pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason="needs the project's .venv (make install)")
def test_data_checksums_pass_in_a_clone_alone(clone: Path) -> None:
    proc = _make(clone, "test", "ARGS=tests/test_carried_data.py -q -p no:cacheprovider")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "passed" in proc.stdout
