"""Shared test set-up: offline everything, and the local GLUE copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_DEFAULT_GLUE = PROJECT_ROOT.parent / "shared" / "data" / "glue"


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The local GLUE copy: $GLUE_DIR, or ../shared/data/glue beside the project."""
    path = Path(os.environ.get("GLUE_DIR") or _DEFAULT_GLUE)
    if not (path / "sst2" / "train.parquet").exists():
        pytest.fail(f"local GLUE data not found at {path}: set GLUE_DIR (see README)")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenization cache for the whole session, so tests tokenize each split once."""
    return tmp_path_factory.mktemp("cache")
