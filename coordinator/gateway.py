"""The coordinator's public face: a TLS gateway that forwards only the Fleet API to the SuperLink.

Flower 1.41 serves its Control, Runtime and Fleet APIs (plus `/docs`) from one web server, and
the open-source Control API has no authentication. So the SuperLink listens on loopback only,
and this gateway listens on the public address: it forwards `POST /v1/fleet/<name>` for the
exact Fleet routes a SuperNode calls, and `GET`/`HEAD /health`, nothing else. Every other path,
method, query string or percent-encoded path is answered here (404/405) and never reaches the
SuperLink. The upstream URL is built from the allow-listed route name, never from the client's
path. Bodies stream through in both directions (`httpx.AsyncClient`), request bodies bounded
(413 beyond the limit); the SuperNode's signed node-authentication headers pass through
unchanged, so Flower's own node authentication still decides who joins. An upstream failure is
a 502 with a one-line body.

It runs as a uvicorn server in a daemon thread of the `fedsite coordinator` process rather than
as a subprocess: it lives and dies with the coordinator (a killed coordinator leaves no orphan
holding the public port), it needs no second interpreter start, the socket is bound in the
caller's thread (a busy port is an immediate one-line error), and the coordinator's own thread
only waits on Flower's processes, so the asyncio loop has the interpreter to itself.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from finetune.serving import ThreadedServer, listen, serve_in_thread

log = logging.getLogger("fedsite.coordinator")

# every route of Flower 1.41's Fleet API (superlink/routers/fleet/router.py); all POST
FLEET_ROUTES = frozenset(
    {
        "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat", "pull-messages",
        "push-messages", "get-run", "get-fab", "push-object", "pull-object", "confirm-message-received",
    }
)  # fmt: skip
HOP_BY_HOP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"})
DEFAULT_MAX_BODY = 512 << 20  # bytes of one request body
UPSTREAM_TIMEOUT = httpx.Timeout(300.0, connect=10.0, pool=30.0)
UPSTREAM_LIMITS = httpx.Limits(max_connections=512, max_keepalive_connections=64)  # requests in flight to the SuperLink
WARN_EVERY_S = 30.0


class BodyTooLarge(Exception):
    """A request body grew past the gateway's limit while streaming."""


def _refused(status: int = 404) -> Response:
    return PlainTextResponse({404: "not found", 405: "method not allowed", 413: "request body too large"}.get(status, "refused"), status)


def forwarded_headers(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones (fixed list, proxy-*, and any the Connection header names)."""
    pairs = list(items)
    named = {token.strip().lower() for key, value in pairs if key.lower() == "connection" for token in value.split(",")}
    return [(k, v) for k, v in pairs if (low := k.lower()) not in HOP_BY_HOP and low not in named and not low.startswith("proxy-")]


def _length(value: str | None) -> int | None:
    """A Content-Length header as a number; ValueError for anything but digits."""
    if value is None:
        return None
    if not value.strip().isdigit():
        raise ValueError(value)
    return int(value)


def gateway_app(upstream: str, verify: ssl.SSLContext | bool = True, max_body: int = DEFAULT_MAX_BODY, transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """The ASGI app forwarding allowed requests to `upstream` (e.g. `https://127.0.0.1:PORT`)."""
    client = httpx.AsyncClient(
        base_url=upstream.rstrip("/"), verify=verify, timeout=UPSTREAM_TIMEOUT, limits=UPSTREAM_LIMITS, transport=transport, follow_redirects=False
    )
    last_warning = [0.0]  # one line per WARN_EVERY_S while the SuperLink is unreachable (e.g. still starting)

    async def forward(request: Request, path: str) -> Response:
        # the path as sent must be the path as matched: no percent-encoding, no query string
        raw = request.scope.get("raw_path")
        if request.scope.get("query_string") or (raw is not None and raw != request.scope["path"].encode()):
            return _refused()
        headers = forwarded_headers(request.headers.items())
        try:
            declared = _length(request.headers.get("content-length"))
        except ValueError:
            return PlainTextResponse("bad content-length", 400)
        if declared is not None and declared > max_body:
            return _refused(413)
        if declared is not None:  # h11 has framed the body to exactly this many bytes
            headers.append(("content-length", str(declared)))

        async def body() -> AsyncIterator[bytes]:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise BodyTooLarge
                yield chunk

        content = body() if request.method == "POST" else None
        outgoing = client.build_request(request.method, path, headers=headers, content=content)
        try:
            answer = await client.send(outgoing, stream=True)
        except BodyTooLarge:
            return _refused(413)
        except ClientDisconnect:
            return PlainTextResponse("client went away", 400)
        except httpx.HTTPError as err:
            if time.monotonic() - last_warning[0] > WARN_EVERY_S:
                last_warning[0] = time.monotonic()
                log.warning("[fedsite] gateway: SuperLink unreachable (%s on %s); answering 502", type(err).__name__, path)
            return PlainTextResponse("upstream unavailable", 502)
        response = StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, background=BackgroundTask(answer.aclose))
        out = forwarded_headers(answer.headers.multi_items())
        length = answer.headers.get("content-length")
        if length is not None and length.strip().isdigit():  # raw bytes pass unchanged: same length
            out.append(("content-length", str(int(length))))
        response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in out]
        return response

    async def fleet(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in FLEET_ROUTES:
            return _refused()
        return await forward(request, f"/v1/fleet/{name}")

    async def health(request: Request) -> Response:
        return await forward(request, "/health")

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    routes = [
        Route("/v1/fleet/{name}", fleet, methods=["POST"]),
        Route("/health", health, methods=["GET", "HEAD"]),
    ]  # anything else: Starlette's own 404 (unknown path) or 405 (other method), answered here
    app = Starlette(routes=routes, lifespan=lifespan)
    app.router.redirect_slashes = False  # `/v1/fleet/pull-messages/` is a 404, not a redirect
    return app


def upstream_context(ca: str | Path) -> ssl.SSLContext:
    """TLS to the loopback SuperLink, verified against the coordinator's CA (its certificate names 127.0.0.1)."""
    return ssl.create_default_context(cafile=str(ca))


@dataclass
class Gateway:
    """A running gateway: uvicorn in a daemon thread of this process; `stop()` shuts it down gracefully."""

    serving: ThreadedServer
    host: str

    @property
    def port(self) -> int:
        return self.serving.port

    @property
    def thread(self):  # noqa: ANN201
        return self.serving.thread

    def stop(self, timeout: float = 10.0) -> None:
        self.serving.stop(timeout)


def start_gateway(
    host: str,
    port: int,
    upstream: str,
    *,
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> Gateway:
    """Serve the gateway on host:port (port 0: a free one), TLS when cert and key are given."""
    if (cert is None) != (key is None):
        raise ValueError("gateway: give both the TLS certificate and its key, or neither")
    verify: ssl.SSLContext | bool = upstream_context(ca) if ca else upstream.startswith("https")
    sock = listen(host, port, "gateway", backlog=2048)
    config = uvicorn.Config(
        gateway_app(upstream, verify, max_body),
        ssl_certfile=str(cert) if cert else None,
        ssl_keyfile=str(key) if key else None,
        lifespan="on",
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
    )
    serving = serve_in_thread(config, sock, "fedsite-gateway")
    log.info("[fedsite] gateway on %s:%d (%s) -> SuperLink %s: Fleet API and /health only", host, serving.port, "TLS" if cert else "no TLS", upstream)
    return Gateway(serving, host)
