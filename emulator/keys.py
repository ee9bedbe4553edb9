"""Ed25519 signing keys of the coordinator (thin wrap of `cryptography`): PEM or 32 raw bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class PackageError(ValueError):
    """A package or key that must not be used; the message is one line naming the file and the reason."""


def generate_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """A fresh Ed25519 key written as unencrypted PKCS#8 PEM (mode 0600); refuses to overwrite."""
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never clobber a key; owner-only
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return key


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM or 32 raw bytes."""
    data = _read_key_file(path)
    try:
        key = Ed25519PrivateKey.from_private_bytes(data) if len(data) == 32 else serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as err:
        raise PackageError(f"{Path(path).name}: not an Ed25519 private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise PackageError(f"{Path(path).name}: not an Ed25519 private key ({type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM or 32 raw bytes."""
    data = _read_key_file(path)
    try:
        key = Ed25519PublicKey.from_public_bytes(data) if len(data) == 32 else serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise PackageError(f"{Path(path).name}: not an Ed25519 public key ({str(err).splitlines()[0]})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise PackageError(f"{Path(path).name}: not an Ed25519 public key ({type(key).__name__})")
    return key


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: Ed25519PublicKey) -> str:
    """sha256 hex of the raw 32-byte public key: a short name for pinning and logs."""
    return hashlib.sha256(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()


def _read_key_file(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"{path}: key file not found")
    return path.read_bytes()
