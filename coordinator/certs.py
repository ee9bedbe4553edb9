"""Test certificates and node keys for the coordinator service, made with `cryptography`.

`write_certs` makes a self-signed CA and a server certificate it signs (SANs: localhost,
127.0.0.1 and any extra hosts), the files Flower's SuperLink wants for TLS
(`--ssl-ca-certfile`, `--ssl-certfile`, `--ssl-keyfile`) and a SuperNode wants to verify it
(`--root-certificates`). `write_node_key` makes a client's enrolment key pair: an EC P-384
key in OpenSSH format, the format of `flower-supernode --auth-supernode-private-key` and of
`flwr supernode register PUBLIC_KEY`. For production, use certificates from a real CA.

Every file is written through `coordinator.files.write_atomic`: private keys are created
owner-only (0600) from their first byte (`O_CREAT | O_EXCL | O_NOFOLLOW`, no chmod afterwards),
no symbolic link is ever followed, and nothing that exists is overwritten unless `force` is
given (then each file is replaced atomically; a link at a target is replaced, not followed).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.files import write_atomic

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
VALID_DAYS = 365


PRIVATE, PUBLIC = 0o600, 0o644


class CertError(ValueError):
    """A certificate or key that cannot be written as asked (it exists, or a link is in the way)."""


@dataclass(frozen=True)
class CertPaths:
    """Where `write_certs` put the files (all PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def under(cls, out: str | Path) -> CertPaths:
        out = Path(out)
        return cls(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)

    def all(self) -> tuple[Path, Path, Path, Path]:
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key)


def node_key_paths(out: str | Path, name: str) -> tuple[Path, Path]:
    """A client's private key `name` and public key `name.pub` in `out`."""
    return Path(out) / name, Path(out) / f"{name}.pub"


def refuse_existing(paths: Iterable[Path], force: bool) -> None:
    """Without `force`, a one-line CertError for the first path that exists (even as a dangling link)."""
    if force:
        return
    for path in paths:
        if path.is_symlink():
            raise CertError(f"certs: {path} is a symbolic link; refusing to write through it (remove it, pick another --out, or pass --force to replace the link itself)")
        if path.exists():
            what = " (a CA made earlier: with --force, clients must then trust the new ca.crt)" if path.name in (CA_CERT, CA_KEY) else ""
            raise CertError(f"certs: {path} already exists{what}; pass --force to replace it or pick another --out")


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Create `path` with `mode` from the start; replace an existing one only with `force`."""
    try:
        write_atomic(path, data, mode, replace=force)
    except FileExistsError:  # it appeared after refuse_existing looked
        refuse_existing([path], force=False)
        raise CertError(f"certs: {path} already exists; pass --force to replace it or pick another --out") from None
    except OSError as err:
        raise CertError(f"certs: cannot write {path} ({err.strerror or err})") from None


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fedsite"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", "::1", *hosts]):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def write_certs(out: str | Path, hosts: Sequence[str] = (), days: int = VALID_DAYS, force: bool = False) -> CertPaths:
    """Write a CA and a server certificate for `hosts` (plus localhost) into `out`.

    An existing CA or server file is a CertError unless `force` (then all four are replaced).
    """
    out = Path(out)
    paths = CertPaths.under(out)
    refuse_existing(paths.all(), force)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("Fedsite test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "localhost"))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem, pkcs8, plain = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    _write(paths.ca_key, ca_key.private_bytes(pem, pkcs8, plain), PRIVATE, force)
    _write(paths.server_key, server_key.private_bytes(pem, pkcs8, plain), PRIVATE, force)
    _write(paths.ca_cert, ca_cert.public_bytes(pem), PUBLIC, force)
    _write(paths.server_cert, server_cert.public_bytes(pem), PUBLIC, force)
    return paths


def write_node_key(out: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write a client's enrolment key pair `name` (private) and `name.pub` (OpenSSH, EC P-384).

    An existing key of that name is a CertError unless `force`.
    """
    private, public = node_key_paths(out, name)
    refuse_existing((private, public), force)
    private.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), PRIVATE, force)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n", PUBLIC, force)
    return private, public


def write_service_files(
    out: str | Path, hosts: Sequence[str] = (), days: int = VALID_DAYS, clients: int = 0, force: bool = False
) -> tuple[CertPaths, list[tuple[Path, Path]]]:
    """`fedsite certs`: a CA, a server certificate and `clients` key pairs in OUT/clients/.

    Everything is checked before anything is written: without `force`, one existing file
    anywhere leaves the folder exactly as it was.
    """
    names = [f"client-{i}" for i in range(1, clients + 1)]
    refuse_existing([*CertPaths.under(out).all(), *(p for name in names for p in node_key_paths(Path(out) / "clients", name))], force)
    paths = write_certs(out, hosts, days, force)
    return paths, [write_node_key(Path(out) / "clients", name, force) for name in names]
