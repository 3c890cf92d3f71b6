"""The package installs (``pip install .``) and runs outside the repository: configs and carried data come with it."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PROJECT_ROOT


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with ``ubsmoe`` installed from this checkout by pip (a real wheel build).

    Its third-party dependencies are borrowed from the running environment through a
    ``.pth`` line (the test must not download torch); ``ubsmoe`` itself is only the wheel.
    """
    root = tmp_path_factory.mktemp("pkg")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True,
        text=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # a copy of the checkout, so the build writes nothing into the repository
    src = root / "src-copy"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT_ROOT, check=True,
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    for name in files:
        if (PROJECT_ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((PROJECT_ROOT / name).read_bytes())
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-build-isolation", str(src)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return venv


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GLUE_DIR", "PROJECT_ROOT")}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}


def test_installed_package_runs_from_any_directory(installed_venv: Path, tmp_path: Path) -> None:
    python = installed_venv / "bin" / "python"
    where = subprocess.run([python, "-c", "import ubsmoe; print(ubsmoe.__file__)"], capture_output=True, text=True,
                           env=_env(), cwd=tmp_path, check=True).stdout  # fmt: skip
    assert str(PROJECT_ROOT) not in where and str(installed_venv) in where
    proc = subprocess.run(
        [python, "-m", "ubsmoe.train", "experiment=smoke", "dry_run=true"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sst2-ubsmoe" in proc.stdout  # the run banner: configs and the carried SST-2 came from the package
    assert (tmp_path / "logs" / "runs").is_dir()  # outputs go below the working directory


def test_license_is_an_spdx_expression(installed_venv: Path) -> None:
    metadata = next(installed_venv.rglob("ubsmoe-*.dist-info/METADATA")).read_text()
    assert "License-Expression: Apache-2.0" in metadata
