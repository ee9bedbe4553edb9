"""The coordinator's artifact service: a content-addressed, signed store served over gRPC.

Large artifacts (backbone folders, emulator packages) are stored once under their sha256 and
streamed in chunks from any offset, so a client whose connection drops resumes where it was.
The store is a folder that survives restarts:

    <root>/<sha256>        the bytes (a folder artifact as its deterministic tar)
    <root>/<sha256>.json   {"sha256", "kind", "size", "name", "signature", "signer_key_id"}

Round messages carry only an `ArtifactRef` (see protos/artifacts.py); clients fetch with
`client.artifacts.fetch_artifact`. Off loopback the service speaks TLS only and admits only
enrolled clients: `EnrolledOnly`, a gRPC server interceptor, checks each call's signature by
an enrolment key (protos/artifacts.py: `verify_request`), refuses replays of a signature,
and answers UNAUTHENTICATED (no, stale or bad signature) or PERMISSION_DENIED (a key that is
not enrolled) before the store is touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from emulator.keys import key_id, load_signing_key
from finetune.serving import is_loopback
from protos import artifacts_pb2, artifacts_pb2_grpc
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from protos.artifacts import (
    AUTH_WINDOW_S,
    ArtifactError,
    ArtifactRef,
    AuthRefused,
    DigestWriter,
    check_sha256,
    enrolled_keys,
    signed_statement,
    verify_request,
    write_folder_tar,
)

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


class EnrolledOnly(grpc.ServerInterceptor):
    """Admit a call only when an enrolled key signed it within the window, each signature once."""

    def __init__(self, enrolled: dict[bytes, str], window_s: float = AUTH_WINDOW_S) -> None:
        self.enrolled, self.window_s = enrolled, window_s
        self._seen: dict[bytes, float] = {}  # signature -> when it may be forgotten (past the window)
        self._lock = threading.Lock()
        self.admitted = 0

    def admit(self, method: str, metadata, request, context: grpc.ServicerContext) -> None:
        try:
            name, signature = verify_request(metadata, method, request.SerializeToString(deterministic=True), self.enrolled, self.window_s)
        except AuthRefused as err:
            log.warning("%s (refused %s from %s)", err, method.rsplit("/", 1)[-1], context.peer())
            context.abort(grpc.StatusCode.PERMISSION_DENIED if err.denied else grpc.StatusCode.UNAUTHENTICATED, str(err))
        now = time.monotonic()
        with self._lock:
            self._seen = {sig: until for sig, until in self._seen.items() if until > now}
            replayed = signature in self._seen
            self._seen[signature] = now + 2 * self.window_s
            self.admitted += 0 if replayed else 1
        if replayed:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "artifact service: this signature was already used (replay)")
        log.info("artifact service: %s of %s for enrolled key %s", method.rsplit("/", 1)[-1], getattr(request, "sha256", "?")[:12], name)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method, metadata = handler_call_details.method, tuple(handler_call_details.invocation_metadata or ())
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request, context):
                self.admit(method, metadata, request, context)
                return inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def stream(request, context):
                self.admit(method, metadata, request, context)
                yield from inner_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
        return None  # no client-streaming methods here: UNIMPLEMENTED


@dataclass
class ArtifactServer:
    """A running artifact service: its port, bytes streamed so far, and `stop()`."""

    server: grpc.Server
    address: str
    port: int
    servicer: _Servicer
    auth: EnrolledOnly | None = None

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
    enrolled: Iterable[str | Path | EllipticCurvePublicKey] | None = None,
    auth_window_s: float = AUTH_WINDOW_S,
    chunk_size: int = DEFAULT_CHUNK,
    max_workers: int = 8,
) -> ArtifactServer:
    """Start the service on `address` (port 0 picks a free one); TLS when cert and key files are given.

    `enrolled`: the clients' enrolment public keys (OpenSSH `.pub` files, folders of them, or
    keys) admitted to fetch; None admits anyone, which only a loopback address may do.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ArtifactError("tls: give both tls_cert and tls_key, or neither")
    host = address.rsplit(":", 1)[0]
    if not is_loopback(host) and (tls_cert is None or enrolled is None):
        raise ArtifactError(f"{address}: off loopback the artifact service needs TLS (tls_cert, tls_key) and the enrolled client keys (enrolled)")
    keys = enrolled_keys(enrolled) if enrolled is not None else None
    if keys is not None and not keys:
        raise ArtifactError("enrolled: no public keys given (expected .pub files or folders of them)")
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ArtifactError(f"chunk_size: {chunk_size} is outside [{MIN_CHUNK}, {MAX_CHUNK}] bytes")
    credentials = None
    if tls_cert is not None:
        cert = _read(tls_cert, "tls_cert")
        credentials = grpc.ssl_server_credentials([(_read(tls_key, "tls_key"), cert)])
    servicer = _Servicer(store, chunk_size)
    auth = EnrolledOnly(keys, auth_window_s) if keys is not None else None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="artifacts"),
        interceptors=[auth] if auth is not None else None,
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
    who = f"{len(keys)} enrolled keys" if keys is not None else "anyone on loopback"
    log.info("artifact service on %s:%d (%s, %s, %d artifacts)", host, port, "TLS" if tls_cert else "plaintext", who, len(store.list()))
    return ArtifactServer(server, f"{host}:{port}", port, servicer, auth)


def _read(path: str | Path | None, what: str) -> bytes:
    path = Path(str(path))
    if not path.is_file():
        raise ArtifactError(f"{what}: {path}: file not found")
    return path.read_bytes()
