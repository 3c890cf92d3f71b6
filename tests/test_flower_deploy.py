"""A real Flower deployment on loopback: SuperLink + 2 SuperNodes (one per data owner) + ``flwr run``.

Everything listens on 127.0.0.1, Flower's home is a temporary directory with one SuperLink
connection (no default hosted federation), runtime dependency installation is off, and
every daemon is started in its own session and stopped by its pid's process group.
The deployed run must produce the same numbers as the local backend.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flower_helpers import assert_same_final_state, assert_same_metrics
from helpers import compose_config

from ubsmoe.runner import run_experiment

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Two data owners, both sampled every round; one round keeps the deployment under CI budgets.
DEPLOYED = (
    "experiment=smoke",
    "logger=none",
    "federation.num_clients=2",
    "federation.clients_per_round=2",
    "federation.rounds=1",
    "federation.local_steps=2",
    "federation.min_client_size=8",
    "data.max_train_examples=120",
    "data.max_eval_examples=32",
    "fabric.num_threads=1",  # as a SuperNode's process trains: the same float32 sums, the same routing
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 90.0) -> None:
    """Until something accepts connections on 127.0.0.1:port (the SuperLink is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def flower_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(ROOT / "src"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec, flwr-clientapp
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def test_loopback_deployment_equals_local(tmp_path: Path, glue_dir: Path, cache_dir: Path) -> None:
    common = (*DEPLOYED, f"data.local_dir={glue_dir}", f"paths.cache_dir={cache_dir}")
    run_experiment(compose_config(*common, f"paths.output_dir={tmp_path / 'local'}"))

    from ubsmoe.fl.backends.flower_config import write_run_config

    home, run_dir = tmp_path / "flwr-home", tmp_path / "deployed"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    run_config = write_run_config(
        compose_config(*common, "backend=flower", "backend.mode=deployment", f"paths.output_dir={run_dir}"),
        tmp_path / "run_config.toml",
    )
    env = flower_env(home)
    daemons: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> None:
        log = (tmp_path / f"{name}.log").open("wb")
        daemons.append(
            subprocess.Popen(
                [str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it stops what it spawned
            )  # fmt: skip
        )

    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
              "--disable-runtime-dependency-installation")  # fmt: skip
        wait_for_port(port)
        for cid in (0, 1):
            start(f"supernode{cid}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                  "--node-config", f"client-id={cid}", "--host", "127.0.0.1", "--port", str(free_port()))  # fmt: skip
        started = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT / "flower-app"), "loopback", "--run-config", str(run_config)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert started.returncode == 0 and "Successfully started run" in started.stdout, started.stdout + started.stderr
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 400
        while not checkpoint.is_file() and time.monotonic() < deadline:
            assert all(d.poll() is None for d in daemons), "a Flower daemon exited early (see its log in tmp_path)"
            time.sleep(2)
        time.sleep(2)  # the checkpoint is renamed into place last; metrics files are complete
        assert checkpoint.is_file(), (tmp_path / "superlink.log").read_text()[-4000:]
    finally:
        for daemon in daemons:
            try:
                os.killpg(daemon.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for daemon in daemons:
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait(timeout=10)

    assert_same_metrics(tmp_path / "local", run_dir)
    assert_same_final_state(tmp_path / "local", run_dir)
    # every message reached its data owner: both SuperNodes ran a ClientApp for a train message
    for cid in (0, 1):
        assert "train message" in (tmp_path / f"supernode{cid}.log").read_text()
