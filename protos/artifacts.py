"""Artifact wire format shared by the coordinator's store and the client's cache.

An artifact is named by the sha256 of its bytes. A folder (an emulator package, a model
folder) travels as a deterministic tar: sorted names, no timestamps, owners or odd modes, so
the same folder always has the same hash and a client can re-check its unpacked copy by
re-packing it. The coordinator signs `signed_statement(sha256, kind, size)` with its Ed25519
key; round messages carry only an `ArtifactRef`, one string in a Flower `ConfigRecord`.

Fetches are authenticated with the client's enrolment key (the EC key whose public half the
coordinator enrolled for Flower's node authentication): each call carries gRPC metadata with
the public key, a timestamp and an ECDSA signature over `auth_statement(timestamp, method,
request bytes)`, so a signature is good for one method, one request and a short window only.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

KINDS = ("file", "folder")
SCHEME = "fedsite-artifact://"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_READ = 1 << 20


class ArtifactError(ValueError):
    """An artifact, reference or download that must not be used; the message is one line."""


def check_sha256(value: object, what: str = "sha256") -> str:
    """`value` if it is 64 lowercase hex characters (also keeps hashes safe to use as file names)."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ArtifactError(f"{what}: '{str(value)[:80]}' is not a sha256 (expected 64 lowercase hex characters)")
    return value


def check_kind(value: object, what: str = "kind") -> str:
    if value not in KINDS:
        raise ArtifactError(f"{what}: '{value}' is not an artifact kind (expected 'file' or 'folder')")
    return str(value)


def signed_statement(sha256: str, kind: str, size: int) -> bytes:
    """The exact bytes the coordinator signs: hash, kind and size, so none can be swapped alone."""
    return f"fedsite-artifact-v1\n{check_sha256(sha256)}\n{check_kind(kind)}\n{int(size)}".encode()


# ------------------------------------------------------------------ reference in round messages


@dataclass(frozen=True)
class ArtifactRef:
    """Where to fetch an artifact and what it is: `fedsite-artifact://HOST:PORT/KIND/SHA256`."""

    address: str
    sha256: str
    kind: str

    def __post_init__(self) -> None:
        check_sha256(self.sha256)
        check_kind(self.kind)
        if not self.address or "/" in self.address or ":" not in self.address:
            raise ArtifactError(f"address: '{self.address}' is not HOST:PORT")

    def __str__(self) -> str:
        return f"{SCHEME}{self.address}/{self.kind}/{self.sha256}"

    @classmethod
    def parse(cls, text: str) -> ArtifactRef:
        if not isinstance(text, str) or not text.startswith(SCHEME) or text.count("/") != 4:
            raise ArtifactError(f"artifact reference '{str(text)[:120]}': expected {SCHEME}HOST:PORT/KIND/SHA256")
        address, kind, sha256 = text[len(SCHEME) :].split("/")
        return cls(address, sha256, kind)

    def to_config(self, key: str = "artifact") -> dict[str, str]:
        """One string entry for a Flower `ConfigRecord`."""
        return {key: str(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, object], key: str = "artifact") -> ArtifactRef:
        if key not in config:
            raise ArtifactError(f"{key}: missing from the round's config (expected an artifact reference)")
        value = config[key]
        if not isinstance(value, str):
            raise ArtifactError(f"{key}: expected an artifact reference string, got {type(value).__name__}")
        return cls.parse(value)


# ------------------------------------------------------------------ hashing and deterministic tar


class DigestWriter:
    """A write-only sink that hashes and counts what passes through (and copies it to `out`)."""

    def __init__(self, out: BinaryIO | None = None) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.out = out

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in 1 MiB pieces."""
    sink = DigestWriter()
    with open(path, "rb") as handle:
        shutil.copyfileobj(handle, sink, _READ)
    return sink.hexdigest(), sink.size


def write_folder_tar(folder: Path, out: BinaryIO) -> None:
    """Stream `folder` as a deterministic tar into `out` (plain files and folders only)."""
    folder = Path(folder)
    entries = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*"))
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, path in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif stat.S_ISREG(mode):
                info.size, info.mode = path.stat().st_size, 0o755 if mode & stat.S_IXUSR else 0o644
                with open(path, "rb") as handle:
                    tar.addfile(info, handle)
            else:
                raise ArtifactError(f"{path}: not a plain file or folder (links and devices are not packed)")


def folder_digest(folder: Path) -> tuple[str, int]:
    """(sha256 hex, size) of the folder's deterministic tar, without writing it anywhere."""
    sink = DigestWriter()
    write_folder_tar(folder, sink)  # type: ignore[arg-type]
    return sink.hexdigest(), sink.size


def artifact_digest(path: Path) -> tuple[str, str, int]:
    """(sha256, kind, size) of a file or folder as it travels."""
    path = Path(path)
    if path.is_dir():
        sha256, size = folder_digest(path)
        return sha256, "folder", size
    if path.is_file():
        sha256, size = file_digest(path)
        return sha256, "file", size
    raise ArtifactError(f"{path}: not found (expected a file or a folder)")


def unpack_folder(tar_path: Path, target: Path) -> None:
    """Unpack a verified folder tar into a fresh `target` (created here; must not exist)."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar.getmembers():
                if not (member.isfile() or member.isdir()):
                    raise ArtifactError(f"{tar_path.name}: member '{member.name}' is not a plain file or folder")
            tar.extractall(tmp, filter="data")  # refuses absolute names, '..' and links out of tmp
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        tmp.rename(target)
    except tarfile.TarError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"{tar_path.name}: not a folder artifact ({err})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------ request authentication (enrolled clients only)

AUTH_KEY = "fedsite-public-key-bin"  # gRPC metadata: the client's enrolment public key (DER SubjectPublicKeyInfo)
AUTH_TIME = "fedsite-timestamp"  # unix seconds when the client signed
AUTH_SIGNATURE = "fedsite-signature-bin"  # ECDSA-SHA256 over auth_statement(...)
AUTH_WINDOW_S = 60.0  # a signature older (or further in the future) than this is refused


class AuthRefused(ArtifactError):
    """A request whose credentials do not admit it; `denied`: a valid signature by a key not enrolled."""

    def __init__(self, message: str, denied: bool = False) -> None:
        super().__init__(message)
        self.denied = denied


def auth_statement(timestamp: str, method: str, request: bytes) -> bytes:
    """The bytes a client signs: timestamp, gRPC method and the request's sha256."""
    return f"fedsite-artifact-auth-v1\n{timestamp}\n{method}\n{hashlib.sha256(request).hexdigest()}".encode()


def key_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(der: bytes) -> str:
    """A short public name of a key for logs (sha256 of its DER, 16 hex)."""
    return hashlib.sha256(der).hexdigest()[:16]


def load_enrolment_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """A client's enrolment public key: OpenSSH (`.pub`, what `--enroll` takes) or PEM."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: public key file not found")
    data = path.read_bytes()
    try:
        key = serialization.load_pem_public_key(data) if data.lstrip().startswith(b"-----") else serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ArtifactError(f"{path.name}: not an EC public key ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ArtifactError(f"{path.name}: an enrolment key must be EC, got {type(key).__name__}")
    return key


def load_enrolment_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A client's enrolment private key: OpenSSH (what `flower-supernode` takes) or PEM; never logged."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ArtifactError(f"{path}: private key file not found")
    data = path.read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, None) if b"OPENSSH PRIVATE KEY" in data else serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ArtifactError(f"{path.name}: not an unencrypted EC private key ({type(err).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ArtifactError(f"{path.name}: an enrolment key must be EC, got {type(key).__name__}")
    return key


def enrolled_keys(items: Iterable[str | Path | ec.EllipticCurvePublicKey]) -> dict[bytes, str]:
    """DER of each enrolled public key -> its name (file name); folders contribute their `*.pub`."""
    keys: dict[bytes, str] = {}
    for item in items:
        if isinstance(item, ec.EllipticCurvePublicKey):
            keys[key_der(item)] = key_fingerprint(key_der(item))
            continue
        path = Path(item)
        for file in sorted(path.glob("*.pub")) if path.is_dir() else [path]:
            keys[key_der(load_enrolment_public_key(file))] = file.name
    return keys


def sign_request(private_key: ec.EllipticCurvePrivateKey, method: str, request: bytes, now: float | None = None) -> list[tuple[str, str | bytes]]:
    """gRPC metadata that authenticates one call of `method` with this serialized request."""
    timestamp = f"{time.time() if now is None else now:.3f}"
    signature = private_key.sign(auth_statement(timestamp, method, request), ec.ECDSA(hashes.SHA256()))
    return [(AUTH_KEY, key_der(private_key.public_key())), (AUTH_TIME, timestamp), (AUTH_SIGNATURE, signature)]


def verify_request(
    metadata: Sequence[tuple[str, str | bytes]], method: str, request: bytes, enrolled: Mapping[bytes, str], window_s: float = AUTH_WINDOW_S, now: float | None = None
) -> tuple[str, bytes]:
    """(name of the enrolled key, signature) that signed this call; AuthRefused otherwise."""
    values = {key: value for key, value in metadata}
    der, timestamp, signature = values.get(AUTH_KEY), values.get(AUTH_TIME), values.get(AUTH_SIGNATURE)
    if not (isinstance(der, bytes) and isinstance(timestamp, str) and isinstance(signature, bytes)):
        raise AuthRefused("artifact service: unauthenticated request (sign it with the client's enrolment key)")
    try:
        age = (time.time() if now is None else now) - float(timestamp)
    except ValueError:
        raise AuthRefused("artifact service: malformed timestamp") from None
    if not abs(age) <= window_s:
        raise AuthRefused(f"artifact service: signature timestamp is {age:.0f} s off (allowed {window_s:.0f} s): stale, replayed or clock skew")
    try:
        key = serialization.load_der_public_key(der)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("not an EC key")
        key.verify(signature, auth_statement(timestamp, method, request), ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise AuthRefused("artifact service: bad signature") from None
    if der not in enrolled:
        raise AuthRefused(f"artifact service: key {key_fingerprint(der)} is not enrolled", denied=True)
    return enrolled[der], signature
