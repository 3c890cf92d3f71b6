"""Credentials for a Flower deployment that lets no one in: a CA, the SuperLink's TLS certificate, SuperNode keys.

``python -m ubsmoe.apps.certificates --out certs --hosts 10.0.0.1,localhost --clients 2``
writes, with the ``cryptography`` library Flower itself uses:

* ``ca.crt`` / ``ca.key``: a private certificate authority. ``ca.crt`` goes to every
  machine (SuperNodes verify the SuperLink with it, ``flwr`` too); ``ca.key`` stays with
  whoever issues certificates and is needed for nothing else.
* ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for
  every name and address in ``--hosts`` (what SuperNodes and ``flwr`` dial must be one of them).
* ``client-<id>.key`` / ``client-<id>.pub`` for ``id`` in ``0 .. clients-1``: one ECDSA
  P-384 key pair per SuperNode, in the OpenSSH format that ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` read. The private key
  goes to the data owner of that client only; the public key is registered on the SuperLink.

Private keys are written with mode 0600. Existing files are never overwritten (delete them
to make new ones), so a second call with more ``--clients`` adds keys under the same CA.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365
CA_FILES = ("ca.crt", "ca.key")
SERVER_FILES = ("server.pem", "server.key")


def client_key_files(client_id: int) -> tuple[str, str]:
    """The (private, public) key file names of a client's SuperNode."""
    return f"client-{client_id}.key", f"client-{client_id}.pub"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_name(host: str) -> x509.GeneralName:
    """An IP address SAN for an address, a DNS SAN for a name (TLS checks IPs only against IP SANs)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    """A private key file readable by its owner alone (created with 0600, never world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(out: Path, days: int = VALID_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("UB-SMoE deployment CA"))
        .issuer_name(_name("UB-SMoE deployment CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    (out / CA_FILES[0]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / CA_FILES[1], _pem_private(key))
    return cert, key


def load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((out / CA_FILES[0]).read_bytes())
    key = serialization.load_pem_private_key((out / CA_FILES[1]).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{out / CA_FILES[1]} is not an EC private key")
    return cert, key


def make_server_cert(
    out: Path, hosts: Sequence[str], ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
    days: int = VALID_DAYS,
) -> x509.Certificate:  # fmt: skip
    """The SuperLink's certificate for ``hosts`` (its SANs), signed by the CA, for TLS servers only."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    (out / SERVER_FILES[0]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / SERVER_FILES[1], _pem_private(key))
    return cert


def make_client_keys(out: Path, client_id: int) -> tuple[Path, Path]:
    """A SuperNode's ECDSA P-384 key pair in OpenSSH format (what Flower's SuperNode authentication reads)."""
    private_name, public_name = client_key_files(client_id)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        out / private_name,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (out / public_name).write_bytes(public + f" ubsmoe-client-{client_id}\n".encode())
    return out / private_name, out / public_name


def make_credentials(out: Path, hosts: Sequence[str], clients: int, days: int = VALID_DAYS) -> list[Path]:
    """Everything a deployment needs under ``out``; files already there are kept. Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if all((out / f).is_file() for f in CA_FILES):
        ca_cert, ca_key = load_ca(out)
    elif any((out / f).exists() for f in CA_FILES):
        raise FileExistsError(f"{out} holds only one of {CA_FILES}: remove it or bring the other")
    else:
        ca_cert, ca_key = make_ca(out, days)
        written += [out / f for f in CA_FILES]
    if not any((out / f).exists() for f in SERVER_FILES):
        make_server_cert(out, hosts, ca_cert, ca_key, days)
        written += [out / f for f in SERVER_FILES]
    for cid in range(clients):
        if not any((out / f).exists() for f in client_key_files(cid)):
            written += list(make_client_keys(out, cid))
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ubsmoe.apps.certificates",
        description="Make a CA, the SuperLink's TLS certificate and one SuperNode key pair per client.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write into (existing files are kept)")
    parser.add_argument(
        "--hosts", required=True,
        help="comma-separated names and addresses the SuperLink is reached at, e.g. 10.0.0.1,superlink.lab,localhost",
    )  # fmt: skip
    parser.add_argument("--clients", type=int, default=0, help="SuperNode key pairs to make: client-0 .. client-N-1")
    parser.add_argument("--days", type=int, default=VALID_DAYS, help="validity of the certificates in days")
    args = parser.parse_args(argv)
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if args.clients < 0 or args.days < 1:
        parser.error("--clients must be >= 0 and --days >= 1")
    for path in make_credentials(args.out, hosts, args.clients, args.days):
        print(path)


if __name__ == "__main__":
    main()
