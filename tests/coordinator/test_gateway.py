"""The public gateway's route filter, against a fake SuperLink that records every request reaching it.

Requests are driven as raw ASGI scopes (what uvicorn hands the app, so paths like
`/v1/fleet/../control/start-run` arrive un-normalized), then once over real sockets with TLS.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import threading
import time

import httpx
import pytest
import uvicorn
from flwr.common.constant import TIMESTAMP_HEADER
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER

from coordinator.certs import write_certs
from coordinator.gateway import FLEET_ROUTES, forwarded_headers, gateway_app, start_gateway


class FakeSuperLink:
    """An ASGI app standing in for the SuperLink: records (method, path, query, headers, body)."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append({"method": scope["method"], "path": scope["path"], "query": scope["query_string"], "headers": headers, "body": body})
        reply = b"reply:" + body[:16]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/protobuf"), (b"x-flower", b"1"), (b"connection", b"close"), (b"content-length", str(len(reply)).encode())]})
        await send({"type": "http.response.body", "body": reply})


def call(app, method: str, raw_path: bytes, headers: list[tuple[bytes, bytes]] = (), body: bytes = b"", query: bytes = b"", chunks: int = 1) -> tuple[int, dict, bytes]:
    """Drive the ASGI app with one request as uvicorn would (path percent-decoded, raw_path as sent)."""
    from urllib.parse import unquote

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "https",
        "path": unquote(raw_path.decode("latin-1")), "raw_path": raw_path, "query_string": query, "root_path": "",
        "headers": [(b"host", b"coord.example.org"), *headers], "client": ("10.0.0.9", 5000), "server": ("10.0.0.1", 9092),
    }  # fmt: skip
    size = max(1, -(-len(body) // chunks))
    pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    events = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]
    sent: list[dict] = []

    async def receive():
        return events.pop(0) if events else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, out


@pytest.fixture()
def upstream():
    return FakeSuperLink()


@pytest.fixture()
def app(upstream):
    return gateway_app("http://superlink.internal", transport=httpx.ASGITransport(app=upstream), max_body=1000)


# Flower's node-authentication headers (superlink/routers/fleet/node_auth.py reads these)
SIGNED = [(FLEET_HTTP_PUBLIC_KEY_HEADER.encode(), b"cHVibGlj"), (FLEET_HTTP_SIGNATURE_HEADER.encode(), b"c2ln"), (TIMESTAMP_HEADER.encode(), b"2026-01-01T00:00:00+00:00")]


@pytest.mark.parametrize("name", sorted(FLEET_ROUTES))
def test_every_fleet_route_arrives_with_headers_and_body_intact(app, upstream, name):
    body = bytes(range(256)) * 3
    headers = [(b"content-type", b"application/protobuf"), (b"content-length", str(len(body)).encode()), *SIGNED]
    status, reply_headers, reply = call(app, "POST", f"/v1/fleet/{name}".encode(), headers, body, chunks=4)
    assert status == 200 and reply == b"reply:" + body[:16]
    [seen] = upstream.seen
    assert (seen["method"], seen["path"], seen["query"], seen["body"]) == ("POST", f"/v1/fleet/{name}", b"", body)
    for key, value in SIGNED:  # Flower's node-auth headers pass unchanged
        assert seen["headers"][key.decode()] == value.decode()
    assert seen["headers"]["content-type"] == "application/protobuf" and seen["headers"]["content-length"] == str(len(body))
    assert seen["headers"]["host"] == "superlink.internal"  # the client's Host is not passed on
    assert reply_headers["x-flower"] == "1" and reply_headers["content-length"] == str(len(reply)) and "connection" not in reply_headers


def test_health_is_forwarded_for_get_and_head(app, upstream):
    assert call(app, "GET", b"/health")[0] == 200
    assert call(app, "HEAD", b"/health")[0] == 200
    assert [(s["method"], s["path"]) for s in upstream.seen] == [("GET", "/health"), ("HEAD", "/health")]


REFUSED = [
    ("POST", b"/v1/control/start-run", b""),
    ("POST", b"/v1/control/register-node", b""),
    ("POST", b"/v1/control/list-runs", b""),
    ("POST", b"/v1/runtime/acquire-task", b""),
    ("POST", b"/v1/runtime/pull-messages", b""),
    ("GET", b"/docs", b""),
    ("GET", b"/openapi.json", b""),
    ("GET", b"/redoc", b""),
    ("GET", b"/", b""),
    ("POST", b"/v1/fleet/start-run", b""),  # not a Fleet route
    ("POST", b"/v1/fleet/", b""),
    ("POST", b"/v1/fleet/pull-messages/", b""),  # no slash redirect either
    ("POST", b"//v1/fleet/pull-messages", b""),
    ("POST", b"/v1/fleet/../control/start-run", b""),
    ("POST", b"/v1/fleet/%2e%2e/control/start-run", b""),
    ("POST", b"/v1/fleet/..%2Fcontrol%2Fstart-run", b""),
    ("POST", b"/v1/fleet/pull%2Dmessages", b""),  # percent-encoded, even of an allowed name
    ("POST", b"/v1/fleet/pull-messages%00", b""),
    ("POST", b"/V1/FLEET/PULL-MESSAGES", b""),
    ("POST", b"/v1/fleet/pull-messages", b"next=/v1/control/start-run"),  # query strings
    ("POST", b"/health", b""),
    ("GET", b"/health", b"x=1"),
    ("GET", b"/v1/fleet/pull-messages", b""),  # other methods
    ("PUT", b"/v1/fleet/push-messages", b""),
    ("DELETE", b"/v1/fleet/unregister-node", b""),
    ("OPTIONS", b"/v1/fleet/activate-node", b""),
]


@pytest.mark.parametrize("method, path, query", REFUSED)
def test_everything_else_is_refused_without_reaching_the_superlink(app, upstream, method, path, query):
    status, _, body = call(app, method, path, [(b"content-type", b"application/protobuf"), *SIGNED], b"payload", query=query)
    assert status in (403, 404, 405), (status, body)
    assert upstream.seen == []
    assert b"Traceback" not in body and len(body) < 100


def test_a_body_past_the_limit_is_413_declared_or_streamed(app, upstream):
    status, _, _ = call(app, "POST", b"/v1/fleet/push-object", [(b"content-length", b"1001")], b"x" * 1001)
    assert status == 413 and upstream.seen == []  # declared too large: refused before reading
    status, _, _ = call(app, "POST", b"/v1/fleet/push-object", [], b"x" * 5000, chunks=10)  # chunked, no length
    assert status == 413
    assert all(len(s["body"]) <= 1000 for s in upstream.seen)  # never more than the limit passed on
    status, _, _ = call(app, "POST", b"/v1/fleet/push-object", [(b"content-length", b"12x")], b"x")
    assert status == 400
    assert call(app, "POST", b"/v1/fleet/push-object", [(b"content-length", b"1000")], b"x" * 1000)[0] == 200  # at the limit


def test_an_unreachable_superlink_is_a_502_with_a_short_body():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens once closed
    app = gateway_app(f"http://127.0.0.1:{port}")
    status, _, body = call(app, "POST", b"/v1/fleet/pull-messages", [(b"content-length", b"3")], b"abc")
    assert (status, body) == (502, b"upstream unavailable")


def test_hop_by_hop_headers_are_dropped():
    headers = [("Host", "h"), ("Connection", "keep-alive, X-Secret-Hop"), ("X-Secret-Hop", "1"), ("Keep-Alive", "5"), ("TE", "trailers"),
               ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic x"), ("Trailer", "x"),
               ("Content-Length", "3"), ("Flwr-Signature", "c2ln"), ("Content-Type", "application/protobuf")]  # fmt: skip
    assert forwarded_headers(headers) == [("Flwr-Signature", "c2ln"), ("Content-Type", "application/protobuf")]


# ------------------------------------------------------------------ real sockets, TLS


def _serve_plain(app) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, sock.getsockname()[1]


def test_over_tls_sockets_only_fleet_routes_get_through(tmp_path, upstream):
    paths = write_certs(tmp_path / "certs")
    server, thread, port = _serve_plain(upstream)
    gateway = start_gateway("127.0.0.1", 0, f"http://127.0.0.1:{port}", cert=paths.server_cert, key=paths.server_key, max_body=1 << 20)
    try:
        context = ssl.create_default_context(cafile=str(paths.ca_cert))

        def post(path: str, body: bytes = b"") -> int:
            connection = http.client.HTTPSConnection("127.0.0.1", gateway.port, context=context, timeout=10)
            connection.request("POST", path, body=body, headers={"content-type": "application/protobuf", FLEET_HTTP_SIGNATURE_HEADER: "c2ln"})
            status = connection.getresponse().status
            connection.close()
            return status

        for path in ("/v1/control/start-run", "/v1/control/list-runs", "/v1/runtime/acquire-task", "/v1/fleet/../control/start-run", "/v1/fleet/%2e%2e/control/start-run"):
            assert post(path) in (403, 404, 405), path
        assert upstream.seen == []
        assert post("/v1/fleet/pull-messages", b"\x08\x01" * 1000) == 200
        [seen] = upstream.seen
        assert seen["path"] == "/v1/fleet/pull-messages" and seen["body"] == b"\x08\x01" * 1000 and seen["headers"][FLEET_HTTP_SIGNATURE_HEADER] == "c2ln"
        with pytest.raises(ssl.SSLError):  # the public side speaks TLS only
            ssl.create_default_context().wrap_socket(socket.create_connection(("127.0.0.1", gateway.port)), server_hostname="nowhere.invalid")
    finally:
        gateway.stop()
        server.should_exit = True
        thread.join(5)
    assert not gateway.thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gateway.port), timeout=2).close()


def test_a_busy_port_is_a_one_line_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError, match=r"gateway: cannot listen on 127\.0\.0\.1:\d+") as err:
            start_gateway("127.0.0.1", busy.getsockname()[1], "http://127.0.0.1:1")
    assert "\n" not in str(err.value)
