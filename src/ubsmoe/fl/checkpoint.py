"""Checkpoints that survive crashes: atomic, checksummed, rotated, loaded without unpickling code.

A checkpoint holds what training changes and nothing it can rebuild: the server state
(global trainable tensors, phi, PG defaults, utilization), the round, the sampler's
generator, the torch / numpy / python RNG states, the strategy's and callbacks' state, the
fault log, the run fingerprint (the config keys that must not change across a resume) and
a *reference* to the frozen backbone (its name, resolved path and size), never its weights:
the backbone is rebuilt from ``model.backbone`` on resume, so a 7B backbone does not cost
14 GB a round.

On disk, ``checkpoints/round-000003.ckpt`` is one header line followed by the bytes of
``torch.save(state)``::

    UBSMOE-CKPT 2 round=3 size=123456 sha256=<hex>\\n<payload>

The checksum is verified before the payload is unpickled, and the payload is read with
``torch.load(weights_only=True)``, so the state is made of tensors and primitive
containers only. Writing goes to ``<name>.tmp`` (flushed and fsynced), then an atomic
rename; the newest ``keep`` round files are kept, so a crash during a write always leaves
the previous checkpoint intact. ``last.ckpt`` is a hard link to the newest one (a copy
where the file system has no hard links).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ubsmoe.errors import ConfigError

CHECKPOINT_DIR = Path("checkpoints")
CHECKPOINT_FILE = CHECKPOINT_DIR / "last.ckpt"
FORMAT = "ubsmoe-checkpoint-v2"
MAGIC = b"UBSMOE-CKPT 2"
_HEADER = re.compile(rb"^UBSMOE-CKPT 2 round=(\d+) size=(\d+) sha256=([0-9a-f]{64})$")
_ROUND_FILE = re.compile(r"^round-(\d+)\.ckpt$")

# Test hook: ``UBSMOE_TEST_PAUSE=write:N`` stops the writer of round N half way through its
# temporary file (after touching ``<tmp>.paused``), ``round:N`` stops round N after local
# training, so a test can SIGKILL the run at exactly that moment. Unset in normal runs.
PAUSE_ENV = "UBSMOE_TEST_PAUSE"


def pause_for_test(point: str, round_number: int, marker: Path) -> None:
    """Sleep forever (until killed) if ``$UBSMOE_TEST_PAUSE`` names this point and round."""
    if os.environ.get(PAUSE_ENV) != f"{point}:{round_number}":
        return
    marker.write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)


def round_file(directory: Path, round_number: int) -> Path:
    return directory / f"round-{round_number:06d}.ckpt"


def serialize(state: dict[str, Any], round_number: int) -> bytes:
    """Header line (round, payload size, sha256) + ``torch.save`` bytes of ``state``."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    return MAGIC + f" round={round_number} size={len(payload)} sha256={digest}\n".encode() + payload


class CheckpointError(ValueError):
    """A checkpoint file that is not intact (altered, truncated, or not a checkpoint)."""


def read_verified(path: Path) -> dict[str, Any]:
    """Read ``path``, verify its size and checksum, unpickle with ``weights_only=True``.

    Raises :class:`CheckpointError` saying what is wrong (not :class:`ConfigError`: the
    caller knows whether the file was asked for or found while scanning).
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read it ({err})") from err
    newline = data.find(b"\n", 0, 256)
    header = _HEADER.match(data[:newline]) if newline > 0 else None
    if header is None:
        raise CheckpointError("no UB-SMoE checkpoint header (not a checkpoint, or one from an older version)")
    size, digest = int(header[2]), header[3].decode()
    payload = data[newline + 1 :]
    if len(payload) != size:
        raise CheckpointError(f"truncated or extended: {len(payload)} payload bytes, the header says {size}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError("checksum mismatch: the file was altered or damaged after it was written")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a checksummed payload that does not load is still a bad file
        raise CheckpointError(f"the payload does not load ({err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"not a checkpoint of format {FORMAT}")
    return state


def round_files(directory: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of every ``round-N.ckpt`` in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m[1]), p) for p in directory.iterdir() if (m := _ROUND_FILE.match(p.name))]
    return sorted(found, reverse=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def older_good(path: Path) -> Path | None:
    """The newest intact round checkpoint beside ``path`` that is older than it (or not the same file)."""
    match = _ROUND_FILE.match(path.name)
    limit = int(match[1]) if match else None
    for number, candidate in round_files(path.parent):
        if limit is not None and number >= limit:
            continue
        if _same_file(candidate, path):
            continue
        try:
            read_verified(candidate)
        except CheckpointError:
            continue
        return candidate
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :class:`CheckpointStore`, or fail with a ConfigError naming it.

    The error names the next older good checkpoint, if there is one, so the user can resume from it.
    """
    try:
        return read_verified(path)
    except CheckpointError as err:
        older = older_good(path)
        hint = (
            f"the next older good checkpoint is {older} (resume={older})"
            if older is not None
            else f"there is no older good checkpoint in {path.parent}"
        )
        raise ConfigError("resume", str(path), f"an intact UB-SMoE checkpoint: {path} is not ({err}); {hint}") from err


def newest_good(directory: Path, warn: Any = None) -> Path | None:
    """The newest intact ``round-N.ckpt`` of a checkpoint directory; bad newer ones are reported to ``warn``."""
    for _, candidate in round_files(directory):
        try:
            read_verified(candidate)
        except CheckpointError as err:
            if warn is not None:
                warn(f"skipping damaged checkpoint {candidate}: {err}")
            continue
        return candidate
    return None


def resolve_resume(resume: Any, output_dir: Path, warn: Any = None) -> Path | None:
    """The checkpoint file ``resume`` names: null, true (this run directory) or a file / run directory.

    For a directory (``true`` means the run's own), the newest *intact* checkpoint is chosen.
    """
    if resume is None:
        return None
    if resume is True:
        directory = output_dir / CHECKPOINT_DIR
        found = newest_good(directory, warn)
        if found is None:
            raise ConfigError(
                "resume",
                True,
                f"a run directory with an intact checkpoint; {directory} has none "
                "(pass paths.output_dir=RUN_DIR of the run to continue, or resume=PATH)",
            )
        return found
    path = Path(str(resume))
    if path.is_dir():
        directory = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        found = newest_good(directory, warn)
        if found is None:
            legacy = directory / CHECKPOINT_FILE.name
            if legacy.is_file():
                return legacy  # load_checkpoint says what is wrong with it
            raise ConfigError("resume", resume, f"an existing checkpoint file or run directory (no intact checkpoint in {directory})")
        return found
    if not path.is_file():
        raise ConfigError("resume", resume, f"an existing checkpoint file or run directory ({path} not found)")
    return path


class CheckpointStore:
    """Writes ``round-N.ckpt`` files atomically into one directory and keeps the newest ``keep``."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep}: at least one checkpoint must be kept")
        self.directory = Path(directory)
        self.keep = int(keep)

    def clean_partial(self) -> list[Path]:
        """Remove temporary files a killed writer left behind; return them."""
        if not self.directory.is_dir():
            return []
        stale = [p for p in self.directory.iterdir() if ".tmp" in p.name]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def save(self, state: dict[str, Any], round_number: int) -> Path:
        """Write round ``round_number``'s state: temporary file, fsync, rename, ``last.ckpt``, rotation."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = round_file(self.directory, round_number)
        tmp = target.with_name(target.name + ".tmp")
        data = serialize(state, round_number)
        with tmp.open("wb") as f:
            if os.environ.get(PAUSE_ENV) == f"write:{round_number}":
                f.write(data[: len(data) // 2])
                f.flush()
                pause_for_test("write", round_number, tmp.with_name(tmp.name + ".paused"))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        self._link_last(target)
        self._fsync_dir()
        self._rotate()
        return target

    def _link_last(self, target: Path) -> None:
        last = self.directory / CHECKPOINT_FILE.name
        tmp = last.with_name(last.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
        os.replace(tmp, last)

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        for _, path in round_files(self.directory)[self.keep :]:
            path.unlink(missing_ok=True)


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """A resumed run must keep every setting that shapes the run so far; name the first that differs."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise ConfigError(
                key,
                current.get(key),
                f"the value the checkpoint {path} was written with ({saved.get(key)!r}) to resume it",
            )


class RunInterrupted(BaseException):
    """SIGTERM or Ctrl-C stopped the run between two checkpoints (the current round is abandoned).

    A BaseException, like KeyboardInterrupt, so that the backends' per-client ``except
    Exception`` never mistakes it for a failing client.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class SignalGuard:
    """Turns SIGTERM / SIGINT into :class:`RunInterrupted`, deferred while a checkpoint is written.

    Outside a write the signal raises at once (the round in progress is abandoned, nothing
    is half written); inside :meth:`deferred` it is remembered and raised after the write
    completes, so the newest checkpoint is always whole.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._deferring = False
        self._pending: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self._deferring:
            self._pending = signum
            return
        raise RunInterrupted(signum)

    def __enter__(self) -> SignalGuard:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def deferred(self) -> _Deferred:
        return _Deferred(self)


class _Deferred:
    def __init__(self, guard: SignalGuard) -> None:
        self.guard = guard

    def __enter__(self) -> None:
        self.guard._deferring = True

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.guard._deferring = False
        pending, self.guard._pending = self.guard._pending, None
        if pending is not None and exc_type is None:
            raise RunInterrupted(pending)


def print_interrupted(err: RunInterrupted, checkpoint: Path | None, command: str | None) -> None:
    """What a stopped run tells its user: which signal, the last checkpoint, the exact resume command."""
    lines = [f"Interrupted by {signal.Signals(err.signum).name}: the round in progress was abandoned."]
    if checkpoint is None:
        lines.append("No checkpoint was written yet: start the run again.")
    else:
        lines.append(f"Last checkpoint: {checkpoint}")
        if command:
            lines.append(f"Resume with:\n  {command}")
    print("\n".join(lines), file=sys.stderr, flush=True)
