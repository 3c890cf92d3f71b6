"""Shared test set-up: offline everything, the local GLUE copy, the real smoke runs, parallel workers.

``make test`` runs the suite on ``TEST_WORKERS`` pytest-xdist workers (``--dist loadgroup``).
Each worker, and every process a test starts, gets an equal share of the cores as torch
threads: two processes with two threads each on two cores run several times slower than
one. A test module is one scheduling group (its module fixtures are built once), with two
exceptions: every test that uses the ``smoke_runs`` fixture is in one group (the two smoke
runs are trained once per worker that needs them), and the Flower modules that start a Ray
cluster or a SuperLink are one group (one at a time); ``test_flower.py`` runs Flower in
process and is a group of its own.
"""

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

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # inherited by the runs tests start as subprocesses
    import torch

    torch.set_num_threads(_threads)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_DEFAULT_GLUE = PROJECT_ROOT / "data" / "glue"  # the copy the repository carries

# Modules that open ports and form one scheduling group (the others: one group per module).
FLOWER_MODULES = ("test_flower_deploy.py", "test_flower_ray.py", "test_flower_security.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test its xdist group: the smoke runs' users, the networked Flower modules, else its module."""
    for item in items:
        module = item.path.name
        if "smoke_runs" in getattr(item, "fixturenames", ()):
            group = "smoke_runs"
        elif module in FLOWER_MODULES:
            group = "flower"
        else:
            group = module
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The local GLUE copy: $GLUE_DIR, or the repository's data/glue."""
    path = Path(os.environ.get("GLUE_DIR") or _DEFAULT_GLUE)
    if not (path / "sst2" / "train.parquet").exists():
        pytest.fail(f"local GLUE data not found at {path}: set GLUE_DIR (see README)")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenization cache for the whole test run, so tests tokenize each split once."""
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
