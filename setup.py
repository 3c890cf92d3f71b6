"""Build hook: a wheel carries the config tree and the carried data, so ``pip install .`` works anywhere.

In a checkout (and in an editable install) the package reads the repository's own
``configs/`` and ``data/``; an installed wheel has no repository beside it, so the build
copies both into the package (``ubsmoe/configs``, ``ubsmoe/bundled_data``), where
:func:`ubsmoe.schema.config_dir` and :func:`ubsmoe.data.glue.carried_data_dir` look next.
Everything else about the package is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = {"configs": "configs", "data": "bundled_data"}


class BuildPyWithConfigsAndData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        package = Path(self.build_lib) / "ubsmoe"
        for source, target in BUNDLED.items():
            shutil.copytree(ROOT / source, package / target, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConfigsAndData})
