"""Checkpoints: checksummed, rotated, loaded with weights_only; damaged files name an older good one."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from ubsmoe.errors import ConfigError
from ubsmoe.fl.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointStore,
    RunInterrupted,
    SignalGuard,
    load_checkpoint,
    read_verified,
    resolve_resume,
    round_file,
)


def state_of(round_number: int) -> dict:
    g = torch.Generator().manual_seed(round_number)
    return {
        "server": {"round": round_number, "global_state": {"w": torch.randn(4, 3, generator=g)}},
        "sampler": {"bit_generator": np.random.default_rng(round_number).bit_generator.state},
        "rng": {"python": random.Random(round_number).getstate(), "torch": torch.get_rng_state()},
        "records": [{"round": round_number, "metric": 0.5, "none": None}],
    }


def write_rounds(tmp_path: Path, rounds: int, keep: int = 2) -> CheckpointStore:
    store = CheckpointStore(tmp_path / CHECKPOINT_DIR, keep=keep)
    for r in range(1, rounds + 1):
        store.save(state_of(r), r)
    return store


def test_round_trip_keeps_tensors_and_primitive_state(tmp_path: Path) -> None:
    store = write_rounds(tmp_path, 1)
    loaded = load_checkpoint(round_file(store.directory, 1))
    expected = state_of(1)
    assert torch.equal(loaded["server"]["global_state"]["w"], expected["server"]["global_state"]["w"])
    assert loaded["sampler"] == expected["sampler"]  # 128-bit PCG64 integers survive weights_only
    assert loaded["records"] == expected["records"]
    assert random.Random().setstate(tuple(loaded["rng"]["python"])) is None


def test_only_the_newest_keep_files_stay_and_last_is_the_newest(tmp_path: Path) -> None:
    store = write_rounds(tmp_path, 4, keep=2)
    names = sorted(p.name for p in store.directory.iterdir())
    assert names == ["last.ckpt", "round-000003.ckpt", "round-000004.ckpt"]
    assert (store.directory / "last.ckpt").read_bytes() == round_file(store.directory, 4).read_bytes()
    assert load_checkpoint(store.directory / "last.ckpt")["server"]["round"] == 4


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_names_the_file_and_the_older_good_one(tmp_path: Path, damage: str) -> None:
    store = write_rounds(tmp_path, 3, keep=3)
    newest = round_file(store.directory, 3)
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 100]
    newest.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as err:
        load_checkpoint(newest)
    message = str(err.value)
    older = round_file(store.directory, 2)
    assert str(newest) in message and str(older) in message
    assert ("checksum" in message) if damage == "flip" else ("truncated" in message)
    assert load_checkpoint(older)["server"]["round"] == 2
    # resume=true skips the damaged newest one and says so
    warnings: list[str] = []
    assert resolve_resume(True, tmp_path, warn=warnings.append) == older
    assert len(warnings) == 1 and str(newest) in warnings[0]


def test_damaged_header_and_no_older_checkpoint(tmp_path: Path) -> None:
    store = write_rounds(tmp_path, 1)
    only = round_file(store.directory, 1)
    only.write_bytes(b"X" + only.read_bytes()[1:])
    with pytest.raises(ConfigError, match="no older good checkpoint"):
        load_checkpoint(only)
    with pytest.raises(ConfigError, match="intact checkpoint"):
        resolve_resume(True, tmp_path)


def test_a_killed_write_leaves_the_previous_checkpoint_and_is_cleaned(tmp_path: Path) -> None:
    store = write_rounds(tmp_path, 2)
    partial = round_file(store.directory, 3).with_name("round-000003.ckpt.tmp")
    partial.write_bytes(round_file(store.directory, 2).read_bytes()[:1000])
    assert resolve_resume(True, tmp_path) == round_file(store.directory, 2)
    assert store.clean_partial() == [partial] and not partial.exists()


def test_payload_is_loaded_with_weights_only(tmp_path: Path) -> None:
    """Arbitrary objects are refused even with a correct checksum: loading runs no pickled code."""
    store = CheckpointStore(tmp_path, keep=1)
    path = store.save({"evil": Path("/x")}, 1)
    with pytest.raises(ConfigError, match="does not load"):
        load_checkpoint(path)


def test_signal_guard_defers_during_a_write_and_raises_outside(tmp_path: Path) -> None:
    guard = SignalGuard()
    with guard:
        with pytest.raises(RunInterrupted) as err:
            with guard.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                written = True  # the signal did not interrupt the protected block
        assert written and err.value.signum == signal.SIGTERM
        with pytest.raises(RunInterrupted):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    assert signal.getsignal(signal.SIGTERM) is not guard._handle


def test_read_verified_rejects_a_legacy_pickle(tmp_path: Path) -> None:
    legacy = tmp_path / "last.ckpt"
    torch.save({"format": "ubsmoe-checkpoint-v1"}, legacy)
    with pytest.raises(ValueError, match="header"):
        read_verified(legacy)


def test_resume_command_points_at_the_run_or_at_a_foreign_checkpoint(tmp_path: Path) -> None:
    from ubsmoe.runner import resume_command

    own = resume_command(tmp_path, round_file(tmp_path / CHECKPOINT_DIR, 3))
    assert own.endswith(f"paths.output_dir={tmp_path} resume=true")
    foreign = round_file(tmp_path / "other" / CHECKPOINT_DIR, 3)
    assert resume_command(tmp_path, foreign).endswith(f"resume={foreign}")
