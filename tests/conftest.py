"""Shared test set-up: offline everything, the local GLUE copy, and the real smoke runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import run_train_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_DEFAULT_GLUE = PROJECT_ROOT / "data" / "glue"  # the copy the repository carries


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The local GLUE copy: $GLUE_DIR, or the repository's data/glue."""
    path = Path(os.environ.get("GLUE_DIR") or _DEFAULT_GLUE)
    if not (path / "sst2" / "train.parquet").exists():
        pytest.fail(f"local GLUE data not found at {path}: set GLUE_DIR (see README)")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenization cache for the whole session, so tests tokenize each split once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> dict[str, Path]:
    """Two real smoke runs on the local SST-2 through the CLI: UB-SMoE (with offline W&B) and FedIT.

    Shared by the end-to-end checks and the notebook / plots tests, so the suite trains
    them once.
    """
    root = tmp_path_factory.mktemp("smoke")
    cache = root / "cache"
    runs = {}
    for method, logger in (("ubsmoe", "wandb"), ("fedit", "csv")):
        out = root / method
        proc = run_train_cli(
            "experiment=smoke", f"method={method}", f"logger={logger}", f"paths.output_dir={out}",
            f"paths.cache_dir={cache}", glue_dir=glue_dir,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[method] = out
    return runs
