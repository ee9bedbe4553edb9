"""Fetch large artifacts from the coordinator once: by hash, in chunks, resumable, verified, cached.

Cache layout (one lock per artifact, so processes sharing a cache download it once):

    <cache>/<sha256>             the artifact (a folder artifact unpacked)
    <cache>/<sha256>.json        {"kind", "size", "signature"} to re-check a cached copy
    <cache>/.partial/<sha256>.part, .lock   an unfinished download, resumed from its size

Nothing reaches `<cache>/<sha256>` before its bytes hash to the requested sha256 and the
coordinator's Ed25519 signature over (sha256, kind, size) verifies with the pinned key.
With `auth_key` (the client's enrolment key) every call is signed (protos/artifacts.py:
`sign_request`), as a coordinator off loopback admits only enrolled clients.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from emulator.keys import key_id, load_public_key
from protos import artifacts_pb2, artifacts_pb2_grpc
from protos.artifacts import (
    ArtifactError,
    ArtifactRef,
    artifact_digest,
    check_kind,
    check_sha256,
    load_enrolment_private_key,
    sign_request,
    signed_statement,
    unpack_folder,
)

log = logging.getLogger("fedsite.client")

MESSAGE_LIMIT = (4 << 20) + (64 << 10)  # the server's largest chunk plus its envelope
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}
SERVICE = artifacts_pb2.DESCRIPTOR.services_by_name["ArtifactService"].full_name  # gRPC method names: /SERVICE/Stat
OnChunk = Callable[[int, int, int], None]  # (offset after the chunk, chunk length, artifact size)


@dataclass(frozen=True)
class FetchOptions:
    chunk_size: int = 0  # bytes per chunk; 0: the server's default
    attempts: int = 6  # consecutive failed attempts without progress before giving up
    backoff_s: float = 0.2  # first retry delay; doubles per failure, capped at max_backoff_s
    max_backoff_s: float = 5.0
    recheck_cache: bool = True  # re-hash a cached copy before returning it
    stat_timeout_s: float = 10.0


def fetch_ref(ref: ArtifactRef, cache_dir: str | Path, public_key: Ed25519PublicKey | str | Path, root_cert: str | Path | None = None, **kwargs) -> Path:
    """`fetch_artifact` for a reference from a round message (its kind must match the server's)."""
    return fetch_artifact(ref.address, ref.sha256, cache_dir, public_key, root_cert, kind=ref.kind, **kwargs)


def fetch_artifact(
    address: str,
    sha256: str,
    cache_dir: str | Path,
    public_key: Ed25519PublicKey | str | Path,
    root_cert: str | Path | None = None,
    *,
    kind: str | None = None,
    auth_key: EllipticCurvePrivateKey | str | Path | None = None,
    options: FetchOptions = FetchOptions(),
    on_chunk: OnChunk | None = None,
) -> Path:
    """The verified local copy of artifact `sha256`, downloaded from `address` unless cached.

    TLS when `root_cert` (PEM file of the CA that signed the server's certificate) is given;
    calls signed with `auth_key` (the enrolment private key, OpenSSH or PEM) when given.
    """
    sha256 = check_sha256(sha256)
    if kind is not None:
        check_kind(kind)
    key = public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
    cache = Path(cache_dir).expanduser()
    staging = cache / ".partial"
    staging.mkdir(parents=True, exist_ok=True)
    with _locked(staging / f"{sha256}.lock"):
        state = _check_cache(cache, sha256, key, options.recheck_cache)
        if state == "valid":
            log.info("artifact %s: cache hit %s", sha256[:12], cache / sha256)
            return cache / sha256
        link = _Link(address, _credentials(root_cert), _auth_key(auth_key))
        info = _stat(link, sha256, options, key)
        if kind is not None and info.kind != kind:
            raise ArtifactError(f"artifact {sha256[:12]}: the reference says {kind}, the server says {info.kind}")
        if state == "resign" and (cache / sha256).is_dir() == (info.kind == "folder"):
            _write_meta(cache, info)  # same bytes, now signed by the given key (e.g. a rotated coordinator key)
            return cache / sha256
        part = staging / f"{sha256}.part"
        _download(link, info, part, options, on_chunk)
        return _install(cache, part, info)


# ------------------------------------------------------------------ cache


def _check_cache(cache: Path, sha256: str, key: Ed25519PublicKey, recheck: bool) -> str:
    """'valid', 'resign' (bytes good, signature not by `key`) or 'missing' (a bad copy is removed)."""
    target, meta_path = cache / sha256, cache / f"{sha256}.json"
    if not target.exists():
        return "missing"
    try:
        meta = json.loads(meta_path.read_text())
        kind, size, signature = meta["kind"], int(meta["size"]), bytes.fromhex(meta["signature"])
        if recheck:
            actual = artifact_digest(target)
            if actual != (sha256, kind, size):
                raise ArtifactError(f"cached copy hashes to {actual[0][:12]} ({actual[1]}, {actual[2]} bytes)")
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("artifact %s: cached copy is unusable (%s); fetching again", sha256[:12], str(err).splitlines()[0])
        _remove(target)
        meta_path.unlink(missing_ok=True)
        return "missing"
    try:
        key.verify(signature, signed_statement(sha256, kind, size))
    except InvalidSignature:
        return "resign"
    return "valid"


def _install(cache: Path, part: Path, info: artifacts_pb2.ArtifactInfo) -> Path:
    """Move a verified download into the cache atomically (a folder is unpacked first)."""
    target = cache / info.sha256
    _remove(target)
    try:
        if info.kind == "folder":
            unpack_folder(part, target)
            part.unlink()
        else:
            part.chmod(0o644)
            os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    _write_meta(cache, info)
    log.info("artifact %s: cached at %s", info.sha256[:12], target)
    return target


def _write_meta(cache: Path, info: artifacts_pb2.ArtifactInfo) -> None:
    meta = {"kind": info.kind, "size": info.size, "signature": info.signature.hex()}
    tmp = cache / f".{info.sha256}.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, cache / f"{info.sha256}.json")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock across processes and threads (flock on a file of its own)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------ network


class _Refused(ArtifactError):
    """The server answered, and the answer will not change on retry (NOT_FOUND, DATA_LOSS, ...)."""


class _Retry:
    """Bounded retries with exponential backoff; progress resets the count."""

    def __init__(self, what: str, options: FetchOptions) -> None:
        self.what, self.options, self.failures = what, options, 0

    def failed(self, err: grpc.RpcError | ArtifactError) -> None:
        """Sleep before the next attempt, or raise a one-line error when out of attempts."""
        if isinstance(err, grpc.RpcError):
            code, reason = err.code(), _first_line(err.details())
            if code not in RETRYABLE:
                raise _Refused(f"{self.what}: {code.name}: {reason}") from None
            reason = f"{code.name}: {reason}"
        else:
            reason = str(err)
        self.failures += 1
        if self.failures >= self.options.attempts:
            raise ArtifactError(f"{self.what}: gave up after {self.failures} attempts ({reason})") from None
        delay = min(self.options.backoff_s * 2 ** (self.failures - 1), self.options.max_backoff_s)
        log.warning("%s: %s; retry %d/%d in %.1f s", self.what, reason, self.failures, self.options.attempts - 1, delay)
        time.sleep(delay)


@dataclass(frozen=True)
class _Link:
    """Where and how to call the artifact service: address, TLS credentials, signing key."""

    address: str
    credentials: grpc.ChannelCredentials | None
    auth_key: EllipticCurvePrivateKey | None

    def channel(self) -> grpc.Channel:
        options = [("grpc.max_receive_message_length", MESSAGE_LIMIT)]
        if self.credentials is None:
            return grpc.insecure_channel(self.address, options=options)
        return grpc.secure_channel(self.address, self.credentials, options=options)

    def metadata(self, method: str, request) -> list | None:
        """Signed metadata for one call (fresh timestamp each attempt), or None without a key."""
        if self.auth_key is None:
            return None
        return sign_request(self.auth_key, f"/{SERVICE}/{method}", request.SerializeToString(deterministic=True))


def _auth_key(auth_key: EllipticCurvePrivateKey | str | Path | None) -> EllipticCurvePrivateKey | None:
    if auth_key is None or isinstance(auth_key, EllipticCurvePrivateKey):
        return auth_key
    return load_enrolment_private_key(auth_key)


def _stat(link: _Link, sha256: str, options: FetchOptions, key: Ed25519PublicKey) -> artifacts_pb2.ArtifactInfo:
    """The server's description of the artifact, its signature verified with `key`."""
    address = link.address
    retry = _Retry(f"artifact {sha256[:12]} at {address}", options)
    request = artifacts_pb2.StatRequest(sha256=sha256)
    while True:
        try:
            with link.channel() as channel:
                stub = artifacts_pb2_grpc.ArtifactServiceStub(channel)
                info = stub.Stat(request, timeout=options.stat_timeout_s, metadata=link.metadata("Stat", request))
            break
        except grpc.RpcError as err:
            retry.failed(err)
    if info.sha256 != sha256:
        raise ArtifactError(f"artifact {sha256[:12]} at {address}: the server described artifact {info.sha256[:12]} instead")
    check_kind(info.kind, f"artifact {sha256[:12]}: kind")
    _verify_with(key, info)
    return info


def _verify_with(key: Ed25519PublicKey, info: artifacts_pb2.ArtifactInfo) -> None:
    try:
        key.verify(info.signature, signed_statement(info.sha256, info.kind, info.size))
    except InvalidSignature:
        mine = key_id(key)
        if info.signer_key_id and info.signer_key_id != mine:
            why = f"signed by key {info.signer_key_id[:16]}, not by the given public key {mine[:16]} (wrong key)"
        else:
            why = f"signature does not verify with public key {mine[:16]} (tampered size/kind/signature, or wrong key)"
        raise ArtifactError(f"artifact {info.sha256[:12]}: {why}") from None


def _download(link: _Link, info: artifacts_pb2.ArtifactInfo, part: Path, options: FetchOptions, on_chunk: OnChunk | None) -> None:
    """Append the missing bytes to `part` (resuming from its size), then check their sha256."""
    size, sha256, address = info.size, info.sha256, link.address
    if part.exists() and part.stat().st_size > size:
        part.unlink()
    digest = hashlib.sha256()
    with open(part, "ab+") as out:
        out.seek(0)
        for piece in iter(lambda: out.read(1 << 20), b""):  # hash what an earlier attempt left
            digest.update(piece)
        progress = _Progress(sha256, size, out.tell(), time.monotonic())
        if progress.offset:
            log.info("artifact %s: resuming at %.1f of %.1f MB", sha256[:12], progress.offset / 1e6, size / 1e6)
        retry = _Retry(f"artifact {sha256[:12]} from {address}", options)
        while progress.offset < size:
            before = progress.offset
            try:
                _stream(link, info, options.chunk_size, out, digest, progress, on_chunk)
                if progress.offset < size:
                    raise ArtifactError(f"stream ended at {progress.offset} of {size} bytes")
            except (grpc.RpcError, ArtifactError) as err:
                if progress.offset > before:
                    retry.failures = 0
                try:
                    retry.failed(err)
                except _Refused:  # nothing to resume later: the server will not serve these bytes
                    out.close()
                    part.unlink()
                    raise
    if digest.hexdigest() != sha256:
        part.unlink()
        raise ArtifactError(
            f"artifact {sha256[:12]}: downloaded bytes hash to {digest.hexdigest()[:12]}, not the requested sha256 (tampered or corrupted); download discarded"
        )


@dataclass
class _Progress:
    sha256: str
    size: int
    offset: int
    started: float
    received: int = 0
    next_log: int = 0

    def advance(self, length: int) -> None:
        self.offset += length
        self.received += length
        percent = 100 * self.offset // max(self.size, 1)
        if percent >= self.next_log or self.offset == self.size:
            seconds = max(time.monotonic() - self.started, 1e-9)
            log.info("artifact %s: %3d%% of %.1f MB (%.0f MB/s)", self.sha256[:12], percent, self.size / 1e6, self.received / seconds / 1e6)
            self.next_log = percent // 10 * 10 + 10


def _stream(
    link: _Link,
    info: artifacts_pb2.ArtifactInfo,
    chunk_size: int,
    out: BinaryIO,
    digest: "hashlib._Hash",
    progress: _Progress,
    on_chunk: OnChunk | None,
) -> None:
    """One Fetch call from the current offset; every chunk is written and hashed before the next."""
    request = artifacts_pb2.FetchRequest(sha256=info.sha256, offset=progress.offset, chunk_size=chunk_size)
    with link.channel() as channel:
        for chunk in artifacts_pb2_grpc.ArtifactServiceStub(channel).Fetch(request, metadata=link.metadata("Fetch", request)):
            if chunk.offset != progress.offset or progress.offset + len(chunk.data) > info.size:
                raise ArtifactError(
                    f"artifact {info.sha256[:12]}: server sent bytes {chunk.offset}..{chunk.offset + len(chunk.data)}, expected from {progress.offset} up to {info.size}"
                )
            out.write(chunk.data)
            digest.update(chunk.data)
            progress.advance(len(chunk.data))
            if on_chunk is not None:
                on_chunk(progress.offset, len(chunk.data), info.size)


def _credentials(root_cert: str | Path | None) -> grpc.ChannelCredentials | None:
    if root_cert is None:
        return None
    path = Path(root_cert).expanduser()
    if not path.is_file():
        raise ArtifactError(f"root_cert: {path}: file not found")
    return grpc.ssl_channel_credentials(root_certificates=path.read_bytes())


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "no details"
