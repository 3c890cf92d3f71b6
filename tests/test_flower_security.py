"""A deployment lets no one in: the credentials script, the checks on ``backend.*`` and the commands printed.

No Flower daemon runs here (``test_flower_deploy.py`` runs them): the certificates are
checked with a real TLS handshake on loopback, the SuperNode keys with the loaders Flower's
own CLIs use, and the deployment host's commands and connection file are read back.
"""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from helpers import compose_config

from ubsmoe.apps.certificates import main as make_certificates
from ubsmoe.errors import ConfigError
from ubsmoe.fl.backends import FlowerBackend
from ubsmoe.fl.backends.flower import host_deployment
from ubsmoe.fl.backends.flower_deploy import is_loopback, split_address
from ubsmoe.validate import validate

SMALL = ("experiment=smoke", "logger=none", "federation.num_clients=2", "federation.clients_per_round=2")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_certificates(["--out", str(out), "--hosts", "127.0.0.1,localhost", "--clients", "2"])
    return out


def secure(certs: Path) -> tuple[str, ...]:
    return (
        f"backend.tls.ca_cert={certs / 'ca.crt'}",
        f"backend.tls.server_cert={certs / 'server.pem'}",
        f"backend.tls.server_key={certs / 'server.key'}",
        f"backend.supernode_keys={certs}",
    )


def deployment_config(*overrides: str):
    return compose_config(*SMALL, "backend=flower", "backend.mode=deployment", *overrides)


# ----------------------------------------------------------------------------- credentials
def _handshake(certs: Path, client: ssl.SSLContext, host: str) -> None:
    """One TLS handshake against a server holding ``server.pem``; raises what the client's check raises."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs / "server.pem", certs / "server.key")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass  # the client gave up: its side says why

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client.wrap_socket(raw, server_hostname=host) as tls:
                    tls.sendall(b"x")
        finally:
            thread.join(timeout=10)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_server_certificate_is_trusted_through_the_ca_for_every_host(certs: Path, host: str) -> None:
    client = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    _handshake(certs, client, host)  # raises when the chain or the host name does not check out


def test_a_client_without_the_ca_certificate_cannot_connect(certs: Path) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, ssl.create_default_context(), "127.0.0.1")  # the system CAs only


def test_a_host_not_in_the_certificate_is_refused(certs: Path) -> None:
    client = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, client, "10.0.0.1")


def test_certificates_name_their_hosts_and_the_ca_signs_servers_only(certs: Path) -> None:
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_owner_only_and_supernode_keys_are_what_flower_reads(certs: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key  # deferred: Flower

    for name in ("ca.key", "server.key", "client-0.key", "client-1.key"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600, name
    for name in ("ca.crt", "server.pem", "client-0.pub"):
        assert b"PRIVATE" not in (certs / name).read_bytes()
    private = load_ssh_private_key((certs / "client-0.key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert try_load_public_key(certs / "client-0.pub")  # what `flwr supernode register` accepts
    assert (certs / "client-0.pub").read_bytes() != (certs / "client-1.pub").read_bytes()


def test_a_second_call_keeps_every_file_and_adds_keys_under_the_same_ca(tmp_path: Path) -> None:
    make_certificates(["--out", str(tmp_path), "--hosts", "127.0.0.1", "--clients", "1"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    make_certificates(["--out", str(tmp_path), "--hosts", "127.0.0.1", "--clients", "3"])
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"client-1.key", "client-1.pub", "client-2.key", "client-2.pub"}


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1:9093", True), ("127.4.5.6:1", True), ("[::1]:9093", True), ("localhost:9093", True),
     ("10.0.0.1:9093", False), ("0.0.0.0:9093", False), ("superlink.lab:9093", False), ("[fd00::1]:9093", False)],
)  # fmt: skip
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.1:", ":9093", "10.0.0.1:99999", "fd00::1:9093"])
def test_addresses_without_a_port_are_refused(address: str) -> None:
    with pytest.raises(ValueError):
        split_address(address)


def test_a_deployment_without_credentials_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"backend\.tls\.ca_cert=None .*certificates"):
        validate(deployment_config())


def test_insecure_is_refused_off_loopback_and_allowed_on_it(certs: Path) -> None:
    with pytest.raises(ConfigError, match=r"backend\.insecure=True .*10\.0\.0\.1:9093 \(not loopback\)"):
        validate(deployment_config("backend.superlink=10.0.0.1:9093", "backend.insecure=true"))
    validate(deployment_config("backend.superlink=127.0.0.1:9093", "backend.insecure=true"))
    validate(deployment_config("backend.superlink=10.0.0.1:9093", *secure(certs)))


def test_a_missing_supernode_key_or_file_is_refused(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"client-2\.pub is missing"):
        validate(deployment_config(*secure(certs), "federation.num_clients=3"))
    with pytest.raises(ConfigError, match=r"backend\.tls\.server_key="):
        validate(deployment_config(*secure(certs), f"backend.tls.server_key={tmp_path / 'nope.key'}"))
    with pytest.raises(ConfigError, match=r"backend\.superlink="):
        validate(deployment_config(*secure(certs), "backend.superlink=10.0.0.1"))


# ----------------------------------------------------------------------------- printed commands
def _host(cfg, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(cfg.backend, resolve=True)
    options.pop("name")
    assert host_deployment(FlowerBackend(**options), cfg, lambda: None) is None
    printed = capsys.readouterr().out
    assert (tmp_path / "flower_deployment.txt").read_text() in printed
    return printed


def test_secure_deployment_prints_tls_and_registration_commands(
    certs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomllib

    cfg = deployment_config(*secure(certs), "backend.superlink=10.0.0.1:9093", f"paths.output_dir={tmp_path}")
    printed = _host(cfg, tmp_path, capsys)
    ca = certs / "ca.crt"
    assert (
        f"flower-superlink --host 10.0.0.1 --port 9093 --disable-runtime-dependency-installation --ssl-ca-certfile {ca}"
        f" --ssl-certfile {certs / 'server.pem'} --ssl-keyfile {certs / 'server.key'} --enable-supernode-auth"
    ) in printed
    for cid in (0, 1):
        assert f"flwr supernode register {certs / f'client-{cid}.pub'} ubsmoe" in printed
        assert (
            f"flower-supernode --superlink 10.0.0.1:9093 --root-certificates {ca} "
            f"--auth-supernode-private-key {certs / f'client-{cid}.key'} --node-config client-id={cid}"
        ) in printed
    assert f"FLWR_HOME={tmp_path / 'flwr'} flwr run" in printed and "insecure" not in printed.lower()
    connection = tomllib.loads((tmp_path / "flwr" / "config.toml").read_text())
    assert connection["superlink"] == {
        "default": "ubsmoe", "ubsmoe": {"address": "10.0.0.1:9093", "root-certificates": str(ca)},
    }  # fmt: skip


def test_insecure_deployment_says_it_is_for_loopback_tests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    cfg = deployment_config("backend.insecure=true", f"paths.output_dir={tmp_path}")
    printed = _host(cfg, tmp_path, capsys)
    assert "WARNING: backend.insecure=true: plaintext and no SuperNode authentication; loopback tests only" in printed
    assert "--insecure" in printed and "register" not in printed and "--ssl" not in printed
    assert tomllib.loads((tmp_path / "flwr" / "config.toml").read_text())["superlink"]["ubsmoe"]["insecure"] is True
