"""The coordinator's artifact store and its gRPC service, called directly over loopback."""

from __future__ import annotations

import hashlib
import json
import os
import socket

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.artifacts import ArtifactStore, serve_artifacts
from protos import artifacts_pb2, artifacts_pb2_grpc
from protos.artifacts import ArtifactError, ArtifactRef, folder_digest, signed_statement

PAYLOAD = os.urandom(300_000)


@pytest.fixture()
def key():
    return Ed25519PrivateKey.generate()


@pytest.fixture()
def store(tmp_path, key):
    return ArtifactStore(tmp_path / "store", key)


@pytest.fixture()
def stored(tmp_path, store):
    (tmp_path / "blob.bin").write_bytes(PAYLOAD)
    return store.add(tmp_path / "blob.bin")


@pytest.fixture()
def stub(store):
    server = serve_artifacts(store, chunk_size=64 << 10)
    channel = grpc.insecure_channel(server.address)
    yield artifacts_pb2_grpc.ArtifactServiceStub(channel)
    channel.close()
    server.stop()


def test_add_stores_bytes_under_their_sha256_and_signs_them(tmp_path, store, stored, key):
    assert stored.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert (stored.kind, stored.size, stored.name) == ("file", len(PAYLOAD), "blob.bin")
    assert (tmp_path / "store" / stored.sha256).read_bytes() == PAYLOAD
    key.public_key().verify(stored.signature, signed_statement(stored.sha256, "file", len(PAYLOAD)))
    (tmp_path / "again.bin").write_bytes(PAYLOAD)
    assert store.add(tmp_path / "again.bin").sha256 == stored.sha256  # content-addressed: one copy
    assert [a.sha256 for a in store.list()] == [stored.sha256]
    assert store.ref(stored.sha256, "10.0.0.1:5051") == ArtifactRef("10.0.0.1:5051", stored.sha256, "file")


def test_a_folder_is_stored_as_its_deterministic_tar(tmp_path, store):
    folder = tmp_path / "pkg"
    (folder / "inner").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"w" * 1000)
    (folder / "inner" / "config.json").write_text("{}")
    item = store.add(folder)
    assert (item.sha256, item.size) == folder_digest(folder) and item.kind == "folder"


def test_store_reopens_and_a_new_key_re_signs_on_add(tmp_path, stored):
    other = Ed25519PrivateKey.generate()
    reopened = ArtifactStore(tmp_path / "store", other)
    assert reopened.get(stored.sha256).signature == stored.signature  # survives a restart as it was
    resigned = reopened.add(tmp_path / "blob.bin")
    other.public_key().verify(resigned.signature, signed_statement(stored.sha256, "file", len(PAYLOAD)))


def test_store_errors_are_one_line(tmp_path, store, stored):
    with pytest.raises(ArtifactError, match="missing.bin: not found"):
        store.add(tmp_path / "missing.bin")
    with pytest.raises(KeyError):
        store.get("00" * 32)
    with pytest.raises(ArtifactError, match="is not a sha256"):
        store.get("../../etc/passwd")
    (tmp_path / "store" / f"{stored.sha256}.json").write_text(json.dumps({"kind": "file"}))
    with pytest.raises(ArtifactError, match=r"\.json: not an artifact record \(KeyError"):
        store.get(stored.sha256)


def test_stat_and_fetch_from_an_offset(stub, stored):
    info = stub.Stat(artifacts_pb2.StatRequest(sha256=stored.sha256))
    assert (info.sha256, info.size, info.kind, info.chunk_size) == (stored.sha256, len(PAYLOAD), "file", 64 << 10)
    assert info.signature == stored.signature
    chunks = list(stub.Fetch(artifacts_pb2.FetchRequest(sha256=stored.sha256, offset=1000, chunk_size=100_000)))
    assert [c.offset for c in chunks] == [1000, 101_000, 201_000]
    assert b"".join(c.data for c in chunks) == PAYLOAD[1000:]
    tiny = list(stub.Fetch(artifacts_pb2.FetchRequest(sha256=stored.sha256, offset=0, chunk_size=1)))
    assert len(tiny[0].data) == 16 << 10  # clamped to the server's minimum
    assert list(stub.Fetch(artifacts_pb2.FetchRequest(sha256=stored.sha256, offset=len(PAYLOAD)))) == []


@pytest.mark.parametrize(
    "call, code, words",
    [
        (lambda s: s.Stat(artifacts_pb2.StatRequest(sha256="00" * 32)), grpc.StatusCode.NOT_FOUND, "not in this coordinator's store"),
        (lambda s: s.Stat(artifacts_pb2.StatRequest(sha256="nope")), grpc.StatusCode.INVALID_ARGUMENT, "is not a sha256"),
        (lambda s: list(s.Fetch(artifacts_pb2.FetchRequest(sha256="00" * 32))), grpc.StatusCode.NOT_FOUND, "not in this"),
    ],
)
def test_unknown_or_malformed_hashes_get_clear_status(stub, call, code, words):
    with pytest.raises(grpc.RpcError) as info:
        call(stub)
    assert info.value.code() == code and words in info.value.details()


def test_offset_past_the_end_and_a_truncated_blob_are_refused(tmp_path, stub, stored):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Fetch(artifacts_pb2.FetchRequest(sha256=stored.sha256, offset=len(PAYLOAD) + 1)))
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    with open(tmp_path / "store" / stored.sha256, "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Fetch(artifacts_pb2.FetchRequest(sha256=stored.sha256)))
    assert info.value.code() == grpc.StatusCode.DATA_LOSS and "truncated or replaced" in info.value.details()


def test_serve_refuses_half_tls_a_bad_chunk_size_and_a_busy_port(tmp_path, store):
    with pytest.raises(ArtifactError, match="give both tls_cert and tls_key"):
        serve_artifacts(store, tls_cert=tmp_path / "cert.pem")
    with pytest.raises(ArtifactError, match="tls_cert: .*cert.pem: file not found"):
        serve_artifacts(store, tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem")
    with pytest.raises(ArtifactError, match="chunk_size: 1 is outside"):
        serve_artifacts(store, chunk_size=1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ArtifactError, match="cannot listen"):
            serve_artifacts(store, f"127.0.0.1:{busy.getsockname()[1]}")
