"""The coordinator's artifact service: a content-addressed, signed store served over gRPC.

Large artifacts (backbone folders, emulator packages) are stored once under their sha256 and
streamed in chunks from any offset, so a client whose connection drops resumes where it was.
The store is a folder that survives restarts:

    <root>/<sha256>        the bytes (a folder artifact as its deterministic tar)
    <root>/<sha256>.json   {"sha256", "kind", "size", "name", "signature", "signer_key_id"}

Round messages carry only an `ArtifactRef` (see protos/artifacts.py); clients fetch with
`client.artifacts.fetch_artifact`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from emulator.keys import key_id, load_signing_key
from protos import artifacts_pb2, artifacts_pb2_grpc
from protos.artifacts import ArtifactError, ArtifactRef, DigestWriter, check_sha256, signed_statement, write_folder_tar

log = logging.getLogger("fedsite.coordinator")

DEFAULT_CHUNK = 256 << 10  # 128-512 KiB beat 1 and 4 MiB on loopback (benchmarks/artifacts.py)
MIN_CHUNK, MAX_CHUNK = 16 << 10, 4 << 20
MESSAGE_LIMIT = MAX_CHUNK + (64 << 10)  # a chunk plus its envelope; gRPC's default cap is 4 MiB


@dataclass(frozen=True)
class StoredArtifact:
    sha256: str
    kind: str
    size: int
    name: str
    signature: bytes
    signer_key_id: str
    path: Path


class ArtifactStore:
    """A folder of artifacts named by content hash, each signed by the coordinator's key."""

    def __init__(self, root: str | Path, signing_key: Ed25519PrivateKey | str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.signing_key = signing_key if isinstance(signing_key, Ed25519PrivateKey) else load_signing_key(signing_key)

    def add(self, path: str | Path) -> StoredArtifact:
        """Store a file or folder (idempotent: same content, same hash) and sign it with this store's key."""
        path = Path(path)
        if not path.exists():
            raise ArtifactError(f"{path}: not found (expected a file or a folder to publish)")
        kind = "folder" if path.is_dir() else "file"
        fd, tmp_name = tempfile.mkstemp(prefix=".add-", dir=self.root)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                sink = DigestWriter(out)
                if kind == "folder":
                    write_folder_tar(path, sink)  # type: ignore[arg-type]
                else:
                    with open(path, "rb") as handle:
                        shutil.copyfileobj(handle, sink, 1 << 20)
            sha256, size = sink.hexdigest(), sink.size
            tmp.chmod(0o644)
            os.replace(tmp, self.root / sha256)  # same hash, same bytes: replacing also heals a damaged copy
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        public = self.signing_key.public_key()
        meta = {
            "sha256": sha256,
            "kind": kind,
            "size": size,
            "name": path.name,
            "signature": self.signing_key.sign(signed_statement(sha256, kind, size)).hex(),
            "signer_key_id": key_id(public),
        }
        _write_json_atomically(self.root / f"{sha256}.json", meta)
        log.info("artifact %s: stored %s (%s, %.1f MB)", sha256[:12], path.name, kind, size / 1e6)
        return self.get(sha256)

    def get(self, sha256: str) -> StoredArtifact:
        """The stored artifact; KeyError if this store does not hold it."""
        check_sha256(sha256)
        meta_path, blob = self.root / f"{sha256}.json", self.root / sha256
        if not meta_path.is_file() or not blob.is_file():
            raise KeyError(sha256)
        try:
            meta = json.loads(meta_path.read_text())
            return StoredArtifact(
                sha256, meta["kind"], int(meta["size"]), meta["name"], bytes.fromhex(meta["signature"]), meta["signer_key_id"], blob
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ArtifactError(f"{meta_path}: not an artifact record ({type(err).__name__}: {err})") from None

    def list(self) -> list[StoredArtifact]:
        return [self.get(p.stem) for p in sorted(self.root.glob("*.json")) if (self.root / p.stem).is_file()]

    def ref(self, sha256: str, address: str) -> ArtifactRef:
        """The reference a round message carries for a stored artifact served at `address`."""
        return ArtifactRef(address, sha256, self.get(sha256).kind)


def _write_json_atomically(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ------------------------------------------------------------------ gRPC service


class _Servicer(artifacts_pb2_grpc.ArtifactServiceServicer):
    def __init__(self, store: ArtifactStore, chunk_size: int) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self.bytes_sent = 0
        self._lock = threading.Lock()

    def _lookup(self, sha256: str, context: grpc.ServicerContext) -> StoredArtifact:
        try:
            return self.store.get(sha256)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"artifact {sha256}: not in this coordinator's store")
        except ArtifactError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        raise AssertionError("unreachable: context.abort raises")

    def Stat(self, request: artifacts_pb2.StatRequest, context: grpc.ServicerContext) -> artifacts_pb2.ArtifactInfo:
        item = self._lookup(request.sha256, context)
        return artifacts_pb2.ArtifactInfo(
            sha256=item.sha256,
            size=item.size,
            kind=item.kind,
            chunk_size=self.chunk_size,
            signature=item.signature,
            signer_key_id=item.signer_key_id,
        )

    def Fetch(self, request: artifacts_pb2.FetchRequest, context: grpc.ServicerContext):
        item = self._lookup(request.sha256, context)
        offset = request.offset
        if offset > item.size:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"artifact {item.sha256[:12]}: offset {offset} is past its size {item.size}")
        chunk = min(max(request.chunk_size or self.chunk_size, MIN_CHUNK), MAX_CHUNK)
        with open(item.path, "rb") as handle:
            actual = os.fstat(handle.fileno()).st_size
            if actual != item.size:
                context.abort(
                    grpc.StatusCode.DATA_LOSS,
                    f"artifact {item.sha256[:12]}: stored blob is {actual} bytes, its record says {item.size} (truncated or replaced)",
                )
            handle.seek(offset)
            while offset < item.size:
                data = handle.read(min(chunk, item.size - offset))
                if not data:
                    context.abort(grpc.StatusCode.DATA_LOSS, f"artifact {item.sha256[:12]}: stored blob ended at {offset}")
                with self._lock:  # counted when handed to gRPC, so a finished client sees the final count
                    self.bytes_sent += len(data)
                yield artifacts_pb2.Chunk(offset=offset, data=data)
                offset += len(data)


@dataclass
class ArtifactServer:
    """A running artifact service: its port, bytes streamed so far, and `stop()`."""

    server: grpc.Server
    address: str
    port: int
    servicer: _Servicer

    @property
    def bytes_sent(self) -> int:
        return self.servicer.bytes_sent

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; open streams are cut after `grace` seconds (None: at once)."""
        self.server.stop(grace).wait()

    def __enter__(self) -> ArtifactServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def serve_artifacts(
    store: ArtifactStore,
    address: str = "127.0.0.1:0",
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    max_workers: int = 8,
) -> ArtifactServer:
    """Start the service on `address` (port 0 picks a free one); TLS when cert and key files are given."""
    if (tls_cert is None) != (tls_key is None):
        raise ArtifactError("tls: give both tls_cert and tls_key, or neither")
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ArtifactError(f"chunk_size: {chunk_size} is outside [{MIN_CHUNK}, {MAX_CHUNK}] bytes")
    credentials = None
    if tls_cert is not None:
        cert = _read(tls_cert, "tls_cert")
        credentials = grpc.ssl_server_credentials([(_read(tls_key, "tls_key"), cert)])
    servicer = _Servicer(store, chunk_size)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="artifacts"),
        options=[("grpc.max_send_message_length", MESSAGE_LIMIT), ("grpc.so_reuseport", 0)],
    )
    artifacts_pb2_grpc.add_ArtifactServiceServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise ArtifactError(f"{address}: cannot listen ({err})") from None
    if not port:
        raise ArtifactError(f"{address}: cannot listen (address in use or invalid)")
    server.start()
    host = address.rsplit(":", 1)[0]
    log.info("artifact service on %s:%d (%s, %d artifacts)", host, port, "TLS" if tls_cert else "plaintext", len(store.list()))
    return ArtifactServer(server, f"{host}:{port}", port, servicer)


def _read(path: str | Path | None, what: str) -> bytes:
    path = Path(str(path))
    if not path.is_file():
        raise ArtifactError(f"{what}: {path}: file not found")
    return path.read_bytes()
