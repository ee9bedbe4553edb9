"""Artifact wire format shared by the coordinator's store and the client's cache.

An artifact is named by the sha256 of its bytes. A folder (an emulator package, a model
folder) travels as a deterministic tar: sorted names, no timestamps, owners or odd modes, so
the same folder always has the same hash and a client can re-check its unpacked copy by
re-packing it. The coordinator signs `signed_statement(sha256, kind, size)` with its Ed25519
key; round messages carry only an `ArtifactRef`, one string in a Flower `ConfigRecord`.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping

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
