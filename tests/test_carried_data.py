"""The data the repository carries is exactly the published copy: every file listed, every checksum equal."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("name", ["glue", "commonsense"])
def test_carried_files_match_their_checksums(name: str) -> None:
    root = DATA / name
    sums = json.loads((root / "SHA256SUMS.json").read_text())
    assert sums, f"{root}/SHA256SUMS.json lists no files"
    for relative, expected in sums.items():
        assert _sha256(root / relative) == expected, f"{name}/{relative} differs from its checksum"
    data_files = {
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix in (".parquet", ".json")
    } - {"SHA256SUMS.json"}
    assert data_files == set(sums), f"files without a checksum (or missing): {data_files ^ set(sums)}"


def test_a_task_not_carried_fails_at_once_when_the_hub_is_off(monkeypatch) -> None:
    import time

    from ubsmoe.data import glue
    from ubsmoe.errors import ConfigError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GLUE_DIR", raising=False)
    assert glue.resolve_local_dir(None, "qnli") is None  # not carried: the hub
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"qnli/<split>\.parquet.*switched off") as err:
        glue.load_glue(glue.get_task("qnli"), None, ["train"])
    assert err.value.key == "data.local_dir"
    assert time.perf_counter() - start < 2.0  # no retries against an unreachable hub
