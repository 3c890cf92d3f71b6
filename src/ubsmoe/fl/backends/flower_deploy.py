"""A deployment's security settings and the commands that start it: TLS, registered SuperNode keys, or loopback.

``backend.mode=deployment`` runs the federation on a SuperLink that data owners' SuperNodes
connect to. By default it lets no one in: the SuperLink serves TLS with a certificate of
the run's own CA (``backend.tls``), and accepts only SuperNodes whose public key was
registered with ``flwr supernode register`` (``backend.supernode_keys``: the folder of
``client-<id>.pub`` / ``client-<id>.key`` that :mod:`ubsmoe.apps.certificates` writes). The
plaintext, unauthenticated ``backend.insecure=true`` exists for tests on one machine and is
refused for any SuperLink address that is not loopback (validation says so before any work).

Each command is built here once as an argument list: the deployment host prints them, and
the loopback tests start their daemons with the very same lists.
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONNECTION = "ubsmoe"  # the name of the SuperLink connection in the flwr CLI's config.toml
TLS_KEYS = ("ca_cert", "server_cert", "server_key")
SUPERNODE_PORT = 9094  # a SuperNode's own local API; one port per SuperNode on a machine
INSECURE_NOTE = "backend.insecure=true: plaintext and no SuperNode authentication; loopback tests only"


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port); ValueError when it is not one."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address as [addr]:port")
    return host, int(port)


def is_loopback(address: str) -> bool:
    """Whether a ``host:port`` names this machine only (127.0.0.0/8, ::1 or localhost)."""
    host, _ = split_address(address)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve to an outward address


@dataclass(frozen=True)
class Deployment:
    """Where the SuperLink listens and who may talk to it (the deployment keys of the ``backend`` group)."""

    superlink: str
    insecure: bool = False
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None
    supernode_keys: Path | None = None

    @classmethod
    def from_options(
        cls, superlink: str, insecure: bool, tls: Mapping[str, Any] | None, supernode_keys: str | Path | None
    ) -> Deployment:
        """From the ``backend`` group's keys; paths made absolute (the printed commands run elsewhere)."""

        def absolute(value: Any) -> Path | None:
            return None if value in (None, "") else Path(str(value)).expanduser().resolve()

        tls = tls or {}
        return cls(
            superlink=str(superlink),
            insecure=bool(insecure),
            ca_cert=absolute(tls.get("ca_cert")),
            server_cert=absolute(tls.get("server_cert")),
            server_key=absolute(tls.get("server_key")),
            supernode_keys=absolute(supernode_keys),
        )

    # ------------------------------------------------------------------ files
    def public_key(self, client_id: int) -> Path:
        assert self.supernode_keys is not None
        return self.supernode_keys / f"client-{client_id}.pub"

    def private_key(self, client_id: int) -> Path:
        assert self.supernode_keys is not None
        return self.supernode_keys / f"client-{client_id}.key"

    def connection_toml(self) -> str:
        """The flwr CLI's ``config.toml`` with one SuperLink connection, :data:`CONNECTION`, as default."""
        import tomli_w  # deferred: part of the optional Flower dependencies

        connection: dict[str, Any] = {"address": self.superlink}
        if self.insecure:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(self.ca_cert)
        return tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})

    # ------------------------------------------------------------------ commands
    def superlink_argv(self) -> list[str]:
        host, port = split_address(self.superlink)
        argv = ["flower-superlink", "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
        if self.insecure:
            return [*argv, "--insecure"]
        return [
            *argv,
            "--ssl-ca-certfile", str(self.ca_cert),
            "--ssl-certfile", str(self.server_cert),
            "--ssl-keyfile", str(self.server_key),
            "--enable-supernode-auth",
        ]  # fmt: skip

    def register_argv(self, client_id: int) -> list[str]:
        """``flwr supernode register``: lets the SuperNode holding this client's private key in."""
        return ["flwr", "supernode", "register", str(self.public_key(client_id)), CONNECTION]

    def supernode_argv(self, client_id: int, port: int | None = None, private_key: Path | None = None) -> list[str]:
        """One SuperNode for one client; ``port`` is its local API (one per SuperNode on a machine)."""
        argv = ["flower-supernode", "--superlink", self.superlink]
        if self.insecure:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.ca_cert)]
            argv += ["--auth-supernode-private-key", str(private_key or self.private_key(client_id))]
        local = SUPERNODE_PORT + client_id if port is None else port
        return [*argv, "--node-config", f"client-id={client_id}", "--host", "127.0.0.1", "--port", str(local)]

    def run_argv(self, app: Path | str, run_config: Path, stream: bool = True) -> list[str]:
        """``flwr run``; with ``stream`` it shows the ServerApp's log until the run ends."""
        argv = ["flwr", "run", str(app), CONNECTION, "--run-config", str(run_config)]
        return [*argv, "--stream"] if stream else argv

    def instructions(self, app: Path | str, run_config: Path, flwr_home: Path, num_clients: int) -> str:
        """The commands that start this deployment, in order, for a person to run (what the deployment host prints)."""
        home = f"FLWR_HOME={shlex.quote(str(flwr_home))} "  # the flwr CLI's connection to this SuperLink

        def show(argv: list[str], env: str = "") -> str:
            return "  " + env + " ".join(shlex.quote(a) for a in argv)

        out = [f"WARNING: {INSECURE_NOTE}."] if self.insecure else []
        out += [f"1. SuperLink machine: start the SuperLink on {self.superlink}:", show(self.superlink_argv())]
        if not self.insecure:
            out.append("2. SuperLink machine, once the SuperLink is up: register each data owner's SuperNode key:")
            out += [show(self.register_argv(cid), home) for cid in range(num_clients)]
        carry = "" if self.insecure else " (it needs ca.crt and its own client-<id>.key, nothing else)"
        out.append(f"3. Each data owner: one SuperNode per client it holds{carry}:")
        out += [show(self.supernode_argv(cid)) for cid in range(num_clients)]
        out += ["4. SuperLink machine: start the run:", show(self.run_argv(app, run_config), home)]
        return "\n".join(out)
