"""Real Flower deployments on loopback: SuperLink + 2 SuperNodes (one per data owner) + ``flwr run``.

Everything listens on 127.0.0.1, Flower's home is a temporary directory holding the one
SuperLink connection the deployment writes, runtime dependency installation is off, and
every daemon is started in its own session and stopped by its pid's process group. The
daemons are started with the very commands ``backend.mode=deployment`` prints
(:class:`~ubsmoe.fl.backends.flower_deploy.Deployment`). A deployed run must produce the
same numbers as the local backend: plaintext (``backend.insecure``, loopback only), and
with TLS and registered SuperNode keys, where a SuperNode with an unregistered key and one
without the CA certificate are refused while the run goes on without them.
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
from omegaconf import DictConfig, OmegaConf

from ubsmoe.fl.backends import FlowerBackend, build_backend
from ubsmoe.fl.backends.flower_deploy import Deployment
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
        "COLUMNS": "200",  # flwr's tables and errors unwrapped in the logs
    }


class Daemons:
    """Flower daemons of one test, each logging to ``<name>.log``; stopped by process group on exit."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("wb")
        self.running[name] = subprocess.Popen(
            [str(BIN / argv[0]), *argv[1:]], env=self.env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops what it spawned
        )  # fmt: skip
        return self.running[name]

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def cli(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A ``flwr`` CLI command, to its end."""
        return subprocess.run(
            [str(BIN / argv[0]), *argv[1:]], env=env or self.env, cwd=self.folder, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip

    def wait_for_exit(self, name: str, timeout: float = 90.0) -> int:
        return self.running[name].wait(timeout=timeout)

    def __enter__(self) -> Daemons:
        return self

    def __exit__(self, *exc: object) -> None:
        for daemon in self.running.values():
            try:
                os.killpg(daemon.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for daemon in self.running.values():
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait(timeout=10)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path, cache_dir: Path) -> Path:
    """The local backend's run of :data:`DEPLOYED`: what every deployment here must equal."""
    out = tmp_path_factory.mktemp("local")
    run_experiment(compose_config(*DEPLOYED, *_paths(glue_dir, cache_dir), f"paths.output_dir={out}"))
    return out


def _paths(glue_dir: Path, cache_dir: Path) -> tuple[str, str]:
    return f"data.local_dir={glue_dir}", f"paths.cache_dir={cache_dir}"


def _deployment_config(*overrides: str) -> tuple[DictConfig, Deployment]:
    """The deployed run's config and the :class:`Deployment` its backend prints the commands of."""
    cfg = compose_config(*DEPLOYED, "backend=flower", "backend.mode=deployment", *overrides)
    options = OmegaConf.to_container(cfg.backend, resolve=True)
    assert isinstance(options, dict)
    backend = build_backend(**options)
    assert isinstance(backend, FlowerBackend)
    return cfg, backend.deployment


def _run_and_wait(daemons: Daemons, deployment: Deployment, run_config: Path, run_dir: Path, watched: list[str]) -> None:
    """``flwr run`` the app, then wait for the run's last checkpoint while the ``watched`` daemons stay up."""
    started = daemons.cli(deployment.run_argv(ROOT / "flower-app", run_config, stream=False))
    assert started.returncode == 0 and "Successfully started run" in started.stdout, started.stdout + started.stderr
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 400
    while not checkpoint.is_file() and time.monotonic() < deadline:
        exited = [name for name in watched if daemons.running[name].poll() is not None]
        assert not exited, f"{exited} exited early:\n" + "\n".join(daemons.log(n)[-3000:] for n in exited)
        time.sleep(2)
    time.sleep(2)  # the checkpoint is renamed into place last; metrics files are complete
    assert checkpoint.is_file(), daemons.log("superlink")[-4000:]


def test_loopback_deployment_equals_local(tmp_path: Path, glue_dir: Path, cache_dir: Path, local_run: Path) -> None:
    from ubsmoe.fl.backends.flower_config import write_run_config

    home, run_dir = tmp_path / "flwr-home", tmp_path / "deployed"
    home.mkdir()
    port = free_port()
    cfg, deployment = _deployment_config(
        *_paths(glue_dir, cache_dir), f"paths.output_dir={run_dir}",
        f"backend.superlink=127.0.0.1:{port}", "backend.insecure=true",
    )  # fmt: skip
    (home / "config.toml").write_text(deployment.connection_toml())
    run_config = write_run_config(cfg, tmp_path / "run_config.toml")
    with Daemons(tmp_path, flower_env(home)) as daemons:
        daemons.start("superlink", deployment.superlink_argv())
        wait_for_port(port)
        for cid in (0, 1):
            daemons.start(f"supernode{cid}", deployment.supernode_argv(cid, free_port()))
        _run_and_wait(daemons, deployment, run_config, run_dir, ["superlink", "supernode0", "supernode1"])

    assert_same_metrics(local_run, run_dir)
    assert_same_final_state(local_run, run_dir)
    # every message reached its data owner: both SuperNodes ran a ClientApp for a train message
    for cid in (0, 1):
        assert "train message" in daemons.log(f"supernode{cid}")


def test_tls_and_registered_keys_deployment_equals_local_and_refuses_strangers(
    tmp_path: Path, glue_dir: Path, cache_dir: Path, local_run: Path
) -> None:
    from ubsmoe.apps.certificates import make_client_keys, make_credentials
    from ubsmoe.fl.backends.flower_config import write_run_config

    certs, intruder = tmp_path / "certs", tmp_path / "intruder"
    make_credentials(certs, ["127.0.0.1", "localhost"], clients=2)
    intruder.mkdir()
    intruder_key, _ = make_client_keys(intruder, 0)  # a well-formed key pair that nobody registered
    home, no_ca_home, run_dir = tmp_path / "flwr-home", tmp_path / "no-ca-home", tmp_path / "deployed"
    port = free_port()
    cfg, deployment = _deployment_config(
        *_paths(glue_dir, cache_dir), f"paths.output_dir={run_dir}", f"backend.superlink=127.0.0.1:{port}",
        f"backend.tls.ca_cert={certs / 'ca.crt'}", f"backend.tls.server_cert={certs / 'server.pem'}",
        f"backend.tls.server_key={certs / 'server.key'}", f"backend.supernode_keys={certs}",
    )  # fmt: skip
    connection = deployment.connection_toml()
    without_ca = "\n".join(line for line in connection.splitlines() if not line.startswith("root-certificates"))
    for folder, text in ((home, connection), (no_ca_home, without_ca + "\n")):
        folder.mkdir()
        (folder / "config.toml").write_text(text)
    run_config = write_run_config(cfg, tmp_path / "run_config.toml")
    with Daemons(tmp_path, flower_env(home)) as daemons:
        superlink = deployment.superlink_argv()
        assert "--enable-supernode-auth" in superlink and "--insecure" not in superlink
        daemons.start("superlink", superlink)
        wait_for_port(port)
        for cid in (0, 1):
            registered = daemons.cli(deployment.register_argv(cid))
            assert registered.returncode == 0 and "registered successfully" in registered.stdout, registered.stdout
        # the flwr CLI without the CA certificate cannot reach the SuperLink (the system CAs do not vouch for it)
        listed = daemons.cli(["flwr", "supernode", "list", "ubsmoe"], env=flower_env(no_ca_home))
        assert listed.returncode != 0, listed.stdout
        # an unregistered key claiming client 0, and client 1's registered key without the CA certificate
        daemons.start("intruder", deployment.supernode_argv(0, free_port(), private_key=intruder_key))
        no_ca = [a for a in deployment.supernode_argv(1, free_port()) if a != str(certs / "ca.crt")]
        no_ca.remove("--root-certificates")
        daemons.start("no-ca", no_ca)
        for cid in (0, 1):
            daemons.start(f"supernode{cid}", deployment.supernode_argv(cid, free_port()))
        assert daemons.wait_for_exit("intruder") != 0 and daemons.wait_for_exit("no-ca") != 0
        assert "No SuperNode found with the given public key" in daemons.log("superlink")
        assert "CERTIFICATE_VERIFY_FAILED" in daemons.log("no-ca")
        _run_and_wait(daemons, deployment, run_config, run_dir, ["superlink", "supernode0", "supernode1"])

    assert_same_metrics(local_run, run_dir)
    assert_same_final_state(local_run, run_dir)
    for cid in (0, 1):
        assert "train message" in daemons.log(f"supernode{cid}")
    assert "train message" not in daemons.log("intruder") + daemons.log("no-ca")
