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


# ------------------------------------------------------------------ enrolled clients only


@pytest.fixture()
def enrolment(tmp_path):
    """Two enrolment key pairs as `fedsite certs` writes them; only client-1 is enrolled."""
    from coordinator.certs import write_node_key

    enrolled_private, enrolled_public = write_node_key(tmp_path / "enrolled", "client-1")
    outsider_private, _ = write_node_key(tmp_path / "outsiders", "outsider")
    return enrolled_private, enrolled_public, outsider_private


@pytest.fixture()
def guarded(store, stored, enrolment):
    server = serve_artifacts(store, enrolled=[enrolment[1].parent], chunk_size=64 << 10)
    channel = grpc.insecure_channel(server.address)
    yield server, artifacts_pb2_grpc.ArtifactServiceStub(channel)
    channel.close()
    server.stop()


STAT = "/fedsite.artifacts.ArtifactService/Stat"
FETCH = "/fedsite.artifacts.ArtifactService/Fetch"


def signed(key_file, method: str, request, **kwargs):
    from protos.artifacts import load_enrolment_private_key, sign_request

    return sign_request(load_enrolment_private_key(key_file), method, request.SerializeToString(deterministic=True), **kwargs)


def test_an_enrolled_key_is_admitted_for_stat_and_fetch(guarded, stored, enrolment):
    server, stub = guarded
    request = artifacts_pb2.StatRequest(sha256=stored.sha256)
    assert stub.Stat(request, metadata=signed(enrolment[0], STAT, request)).size == len(PAYLOAD)
    fetch = artifacts_pb2.FetchRequest(sha256=stored.sha256)
    assert b"".join(c.data for c in stub.Fetch(fetch, metadata=signed(enrolment[0], FETCH, fetch))) == PAYLOAD
    assert server.auth.admitted == 2


def _refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_unauthenticated_unknown_stale_tampered_and_replayed_calls_are_refused(guarded, stored, enrolment):
    import time

    server, stub = guarded
    request = artifacts_pb2.StatRequest(sha256=stored.sha256)
    other = artifacts_pb2.StatRequest(sha256="00" * 32)
    good = signed(enrolment[0], STAT, request)
    tampered = [(k, v[:-1] + bytes([v[-1] ^ 1]) if k == "fedsite-signature-bin" else v) for k, v in good]
    cases = {
        "no metadata": (lambda: stub.Stat(request), grpc.StatusCode.UNAUTHENTICATED, "unauthenticated request"),
        "unknown key": (lambda: stub.Stat(request, metadata=signed(enrolment[2], STAT, request)), grpc.StatusCode.PERMISSION_DENIED, "is not enrolled"),
        "stale": (lambda: stub.Stat(request, metadata=signed(enrolment[0], STAT, request, now=time.time() - 120)), grpc.StatusCode.UNAUTHENTICATED, "stale"),
        "future": (lambda: stub.Stat(request, metadata=signed(enrolment[0], STAT, request, now=time.time() + 120)), grpc.StatusCode.UNAUTHENTICATED, "off"),
        "tampered": (lambda: stub.Stat(request, metadata=tampered), grpc.StatusCode.UNAUTHENTICATED, "bad signature"),
        "other request": (lambda: stub.Stat(other, metadata=good), grpc.StatusCode.UNAUTHENTICATED, "bad signature"),
        "other method": (lambda: list(stub.Fetch(artifacts_pb2.FetchRequest(sha256=stored.sha256), metadata=signed(enrolment[0], STAT, artifacts_pb2.FetchRequest(sha256=stored.sha256)))), grpc.StatusCode.UNAUTHENTICATED, "bad signature"),
    }
    for what, (call, code, words) in cases.items():
        err = _refusal(call)
        assert (err.code(), words in err.details()) == (code, True), (what, err.code(), err.details())
    assert server.auth.admitted == 0 and server.servicer.bytes_sent == 0
    assert stub.Stat(request, metadata=good).sha256 == stored.sha256  # the good signature, once
    err = _refusal(lambda: stub.Stat(request, metadata=good))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "replay" in err.details()


def test_off_loopback_needs_tls_and_enrolled_keys(store, enrolment, tmp_path):
    from coordinator.certs import write_certs

    with pytest.raises(ArtifactError, match="off loopback the artifact service needs TLS"):
        serve_artifacts(store, "0.0.0.0:0", enrolled=[enrolment[1]])
    paths = write_certs(tmp_path / "tls")
    with pytest.raises(ArtifactError, match="and the enrolled client keys"):
        serve_artifacts(store, "0.0.0.0:0", paths.server_cert, paths.server_key)
    with pytest.raises(ArtifactError, match="no public keys given"):
        serve_artifacts(store, enrolled=[tmp_path / "tls"])  # a folder without .pub files
    server = serve_artifacts(store, "0.0.0.0:0", paths.server_cert, paths.server_key, enrolled=[enrolment[1]])
    server.stop()
