"""Fetching artifacts end to end over a real gRPC server on loopback: cache, resume, refusals, TLS."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.artifacts import FetchOptions, fetch_artifact, fetch_ref
from coordinator.artifacts import ArtifactStore, serve_artifacts
from coordinator.certs import write_certs
from emulator.keys import public_key_pem
from protos.artifacts import ArtifactError, ArtifactRef, folder_digest, signed_statement

SIZE = 2_000_000
CHUNK = 64 << 10
FAST = FetchOptions(backoff_s=0.02, max_backoff_s=0.1)


class Counter:
    """An on_chunk callback that counts what the client received (and can act at a byte count)."""

    def __init__(self, at: int | None = None, action=None) -> None:
        self.received, self.calls, self.at, self.action = 0, 0, at, action

    def __call__(self, offset: int, length: int, size: int) -> None:
        self.received += length
        self.calls += 1
        if self.at is not None and offset >= self.at:
            self.at = None
            self.action()


@pytest.fixture()
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture()
def source(tmp_path):
    data = os.urandom(SIZE)
    (tmp_path / "payload.bin").write_bytes(data)
    folder = tmp_path / "package"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(os.urandom(300_000))
    (folder / "config.json").write_text('{"layers": 2}')
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    return tmp_path / "payload.bin", folder


@pytest.fixture()
def store(tmp_path, key, source):
    store = ArtifactStore(tmp_path / "store", key)
    store.add(source[0])
    store.add(source[1])
    return store


@pytest.fixture()
def servers(store):
    """Started artifact servers; every one still running is stopped at the end."""
    started = [serve_artifacts(store, chunk_size=CHUNK)]
    yield started
    for server in started:
        server.stop()


@pytest.fixture()
def file_sha(store):
    return next(a.sha256 for a in store.list() if a.kind == "file")


@pytest.fixture()
def folder_sha(store):
    return next(a.sha256 for a in store.list() if a.kind == "folder")


def cache_entries(cache) -> list[str]:
    """What a later fetch could take from the cache (lock files aside)."""
    names = sorted(p.name for p in cache.iterdir() if p.name != ".partial")
    partial = sorted(p.name for p in (cache / ".partial").iterdir() if not p.name.endswith(".lock"))
    return names + partial


@pytest.fixture()
def log_lines():
    """Messages of the client's logger (the "fedsite" logger may not propagate to caplog)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("fedsite.client")
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(before)


def test_round_trip_then_cache_hit_without_network(tmp_path, servers, source, file_sha, key, log_lines):
    counter = Counter()
    path = fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", key.public_key(), on_chunk=counter)
    assert any(f"artifact {file_sha[:12]}: 100% of 2.0 MB" in line for line in log_lines)  # progress is visible
    assert path == tmp_path / "cache" / file_sha and path.read_bytes() == source[0].read_bytes()
    assert counter.received == SIZE and counter.calls == -(-SIZE // CHUNK) and servers[0].bytes_sent == SIZE
    servers[0].stop()
    again = fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", key.public_key())  # server is gone
    assert again == path and servers[0].bytes_sent == SIZE and "cache hit" in log_lines[-1]
    assert cache_entries(tmp_path / "cache") == [file_sha, f"{file_sha}.json"]


def test_dropped_connection_resumes_from_the_offset(tmp_path, servers, store, source, file_sha, key):
    """Stop the server mid-stream and start a new one on the same port: the client carries on."""
    port = servers[0].port

    def restart():
        servers[0].stop()
        servers.append(serve_artifacts(store, f"127.0.0.1:{port}", chunk_size=CHUNK))

    counter = Counter(at=SIZE // 3, action=restart)
    path = fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", key.public_key(), options=FAST, on_chunk=counter)
    assert path.read_bytes() == source[0].read_bytes()
    # the restart happened mid-fetch; whether the old stream's buffered bytes already covered the
    # rest is up to gRPC's flow control, so the resume itself is pinned by the .part test below
    assert len(servers) == 2
    assert counter.received == SIZE  # nothing fetched twice on the client side
    assert servers[0].bytes_sent + servers[1].bytes_sent < 1.2 * SIZE  # ~size in total, not 2x


def test_a_killed_download_resumes_from_its_part_file(tmp_path, servers, source, file_sha, key):
    class Killed(Exception):
        pass

    def kill():
        raise Killed

    with pytest.raises(Killed):
        fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", key.public_key(), on_chunk=Counter(at=SIZE // 2, action=kill))
    part = tmp_path / "cache" / ".partial" / f"{file_sha}.part"
    left = part.stat().st_size
    assert SIZE // 2 <= left < SIZE and not (tmp_path / "cache" / file_sha).exists()
    counter = Counter()
    path = fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", key.public_key(), on_chunk=counter)
    assert path.read_bytes() == source[0].read_bytes()
    assert counter.received == SIZE - left and not part.exists()


def test_tampered_bytes_are_refused_and_leave_nothing(tmp_path, servers, file_sha, key):
    with open(tmp_path / "store" / file_sha, "r+b") as handle:
        handle.seek(SIZE // 2)
        handle.write(b"\x00" * 16)
    with pytest.raises(ArtifactError, match="not the requested sha256 \\(tampered or corrupted\\)") as info:
        fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", key.public_key())
    assert "\n" not in str(info.value) and cache_entries(tmp_path / "cache") == []


def test_a_corrupt_part_file_is_refused_then_the_next_fetch_starts_clean(tmp_path, servers, source, file_sha, key):
    (tmp_path / "cache" / ".partial").mkdir(parents=True)
    (tmp_path / "cache" / ".partial" / f"{file_sha}.part").write_bytes(b"junk" * 1000)
    with pytest.raises(ArtifactError, match="tampered or corrupted"):
        fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", key.public_key())
    assert cache_entries(tmp_path / "cache") == []
    path = fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", key.public_key())
    assert path.read_bytes() == source[0].read_bytes()


def test_truncated_artifacts_are_refused(tmp_path, servers, file_sha, key):
    blob, record = tmp_path / "store" / file_sha, tmp_path / "store" / f"{file_sha}.json"
    with open(blob, "r+b") as handle:
        handle.truncate(SIZE // 2)
    with pytest.raises(ArtifactError, match="DATA_LOSS: .*truncated or replaced"):
        fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", key.public_key())
    meta = json.loads(record.read_text())
    record.write_text(json.dumps({**meta, "size": SIZE // 2}))  # a server that also lies about the size
    sent = servers[0].bytes_sent
    with pytest.raises(ArtifactError, match="signature does not verify"):
        fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", key.public_key())
    assert servers[0].bytes_sent == sent and cache_entries(tmp_path / "cache") == []


def test_wrong_public_key_is_refused_before_any_download(tmp_path, servers, file_sha):
    other = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "other.pem").write_bytes(public_key_pem(other))
    with pytest.raises(ArtifactError, match="signed by key [0-9a-f]{16}, not by the given public key [0-9a-f]{16} \\(wrong key\\)"):
        fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", tmp_path / "other.pem")
    assert servers[0].bytes_sent == 0 and cache_entries(tmp_path / "cache") == []


def test_unknown_hash_bad_hash_and_unreachable_server_are_clear_errors(tmp_path, servers, key):
    with pytest.raises(ArtifactError, match="NOT_FOUND: artifact 0{64}: not in this coordinator's store"):
        fetch_artifact(servers[0].address, "0" * 64, tmp_path / "cache", key.public_key())
    with pytest.raises(ArtifactError, match="sha256: 'latest' is not a sha256"):
        fetch_artifact(servers[0].address, "latest", tmp_path / "cache", key.public_key())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once closed
    options = FetchOptions(attempts=2, backoff_s=0.01, stat_timeout_s=2)
    with pytest.raises(ArtifactError, match=f"at 127.0.0.1:{port}: gave up after 2 attempts \\(UNAVAILABLE"):
        fetch_artifact(f"127.0.0.1:{port}", "0" * 64, tmp_path / "cache", key.public_key(), options=options)


def test_folder_artifact_round_trip_recheck_and_repair(tmp_path, servers, source, folder_sha, key):
    ref = ArtifactRef.from_config(ArtifactRef(servers[0].address, folder_sha, "folder").to_config("emulator"), "emulator")
    path = fetch_ref(ref, tmp_path / "cache", key.public_key())
    assert path.is_dir() and sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) == [
        "config.json",
        "tokenizer",
        "tokenizer/vocab.txt",
        "weights.safetensors",
    ]
    assert (path / "weights.safetensors").read_bytes() == (source[1] / "weights.safetensors").read_bytes()
    assert folder_digest(path)[0] == folder_sha and cache_entries(tmp_path / "cache") == [folder_sha, f"{folder_sha}.json"]
    sent = servers[0].bytes_sent
    assert fetch_ref(ref, tmp_path / "cache", key.public_key()) == path and servers[0].bytes_sent == sent
    (path / "config.json").write_text('{"layers": 99}')  # damaged in the cache: fetched again
    repaired = fetch_ref(ref, tmp_path / "cache", key.public_key())
    assert (repaired / "config.json").read_text() == '{"layers": 2}' and servers[0].bytes_sent == 2 * sent
    with pytest.raises(ArtifactError, match="the reference says file, the server says folder"):
        fetch_ref(ArtifactRef(servers[0].address, folder_sha, "file"), tmp_path / "other-cache", key.public_key())


def test_concurrent_fetches_download_once(tmp_path, servers, file_sha, key):
    paths, errors = [], []

    def fetch():
        try:
            paths.append(fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", key.public_key()))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(paths)) == 1 and servers[0].bytes_sent == SIZE


def test_a_rotated_key_re_signs_the_cache_without_a_download(tmp_path, servers, store, source, file_sha, key):
    fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", key.public_key())
    new_key = Ed25519PrivateKey.generate()
    ArtifactStore(store.root, new_key).add(source[0])
    path = fetch_artifact(servers[0].address, file_sha, tmp_path / "cache", new_key.public_key())
    assert servers[0].bytes_sent == SIZE
    meta = json.loads((tmp_path / "cache" / f"{file_sha}.json").read_text())
    new_key.public_key().verify(bytes.fromhex(meta["signature"]), signed_statement(file_sha, "file", SIZE))
    assert path.read_bytes() == source[0].read_bytes()


# ------------------------------------------------------------------ TLS


@pytest.fixture()
def tls_files(tmp_path):
    """Throwaway certificates (a CA and a server cert for localhost and 127.0.0.1) from `fedsite certs`' helper."""
    paths = write_certs(tmp_path / "tls")
    return paths.ca_cert, paths.server_cert, paths.server_key


def test_tls_round_trip_and_plaintext_client_refused(tmp_path, store, source, file_sha, key, tls_files):
    root, cert, private = tls_files
    with serve_artifacts(store, tls_cert=cert, tls_key=private, chunk_size=CHUNK) as server:
        path = fetch_artifact(server.address, file_sha, tmp_path / "cache", key.public_key(), root_cert=root)
        assert path.read_bytes() == source[0].read_bytes()
        options = FetchOptions(attempts=2, backoff_s=0.01, stat_timeout_s=2)
        with pytest.raises(ArtifactError, match="gave up after 2 attempts \\(UNAVAILABLE"):
            fetch_artifact(server.address, file_sha, tmp_path / "plain-cache", key.public_key(), options=options)
    with pytest.raises(ArtifactError, match="root_cert: .*missing.pem: file not found"):
        fetch_artifact(server.address, file_sha, tmp_path / "x", key.public_key(), root_cert=tmp_path / "missing.pem", options=options)


def test_tls_fetch_signed_with_the_enrolment_key_only_enrolled_clients_get_bytes(tmp_path, store, source, file_sha, key, tls_files):
    from coordinator.certs import write_node_key

    root, cert, private = tls_files
    client_key, client_pub = write_node_key(tmp_path / "enrolled", "client-1")
    outsider, _ = write_node_key(tmp_path / "outsiders", "outsider")
    options = FetchOptions(attempts=2, backoff_s=0.01, stat_timeout_s=5)
    with serve_artifacts(store, "127.0.0.1:0", cert, private, enrolled=[client_pub], chunk_size=CHUNK) as server:
        with pytest.raises(ArtifactError, match="UNAUTHENTICATED: artifact service: unauthenticated request"):
            fetch_artifact(server.address, file_sha, tmp_path / "anon", key.public_key(), root_cert=root, options=options)
        with pytest.raises(ArtifactError, match="PERMISSION_DENIED: artifact service: key [0-9a-f]{16} is not enrolled"):
            fetch_artifact(server.address, file_sha, tmp_path / "outsider", key.public_key(), root_cert=root, auth_key=outsider, options=options)
        assert server.bytes_sent == 0
        ref = ArtifactRef(f"localhost:{server.port}", file_sha, "file")
        path = fetch_ref(ref, tmp_path / "cache", key.public_key(), root_cert=root, auth_key=client_key)
        assert path.read_bytes() == source[0].read_bytes() and server.auth.admitted == 2  # Stat + Fetch
        assert server.bytes_sent == SIZE


def test_a_cache_under_the_home_folder_is_expanded(tmp_path, servers, file_sha, key, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = fetch_artifact(servers[0].address, file_sha, "~/.cache/fedsite/artifacts", key.public_key())
    assert path == tmp_path / "home" / ".cache" / "fedsite" / "artifacts" / file_sha and path.is_file()
