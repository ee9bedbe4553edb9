"""The dashboard's web app: read-only JSON over the runs' files, and the static front end.

    GET /                          the page (static/index.html)
    GET /static/NAME               the front end's files and plotly.min.js, from an allow-list
    GET /api/runs                  every run with its rounds (from metrics.jsonl) and a version
    GET /api/runs/ID               overview: progress, elapsed, ETA, latest metrics, settings
    GET /api/runs/ID/rounds        the per-round table
    GET /api/runs/ID/clients       the per-client table: ?round=&status=&sort=&order=&offset=&limit=
    GET /api/runs/ID/privacy       the ledger: epsilon per client over rounds, budget, run-level epsilon
    GET /api/runs/ID/offsite       the offsite track's scores and its emulator package
    GET /api/runs/ID/config        config.toml

Only GET and HEAD. A request whose path holds `..`, a backslash, an empty segment or a
percent-encoded dot, slash, backslash or NUL is refused (400) before routing, and run ids are
dictionary keys (dashboard/runs.py), so no part of a request ever becomes a path. JSON responses
carry an ETag: the page polls and gets 304 while nothing changed. With a token, every request
needs it: `Authorization: Bearer TOKEN`, the cookie set by the first `/?token=TOKEN`, compared
in constant time. On loopback the Host header must name loopback (no DNS rebinding).
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import math
import re
from collections.abc import Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from dashboard import views
from dashboard.runs import Run, RunIndex

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

COOKIE = "fedsite_dashboard"
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".html": "text/html; charset=utf-8"}
FRONT_END = ("app.js", "charts.js", "tables.js", "style.css")
BAD_PATH = re.compile(rb"\.\.|\\|//|%(2e|2f|5c|00)", re.IGNORECASE)
JS_SAFE_INT = 2**53
SECURITY_HEADERS = [
    # plotly.js injects its own style rules and style attributes: inline styles only, never inline scripts
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                 b"connect-src 'self'; font-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]  # fmt: skip


def clean(value: Any) -> Any:
    """JSON a browser reads exactly: no NaN/Infinity (null), integers past 2**53 (node ids) as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if -JS_SAFE_INT < value < JS_SAFE_INT else str(value)
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return str(value)


def json_response(request: Request, payload: Any) -> Response:
    body = json.dumps(clean(payload), allow_nan=False, separators=(",", ":")).encode()
    tag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
    headers = {"ETag": tag, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") == tag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


class StaticFiles:
    """The front end's files, read once; each also kept gzip-compressed (plotly.min.js is 4.6 MB)."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, bytes, str]] = {}
        package = resources.files("dashboard") / "static"
        for name in FRONT_END:
            self._add(name, (package / name).read_bytes())
        self._add("plotly.min.js", resources.files("plotly").joinpath("package_data", "plotly.min.js").read_bytes())
        self.version = hashlib.sha256(b"".join(self.files[n][0] for n in sorted(self.files))).hexdigest()[:12]
        self.index = (package / "index.html").read_text().replace("__V__", self.version).encode()

    def _add(self, name: str, data: bytes) -> None:
        suffix = name[name.rfind(".") :]
        self.files[name] = (data, gzip.compress(data, 6, mtime=0), STATIC_TYPES[suffix])

    def response(self, request: Request, name: str) -> Response:
        if name not in self.files:  # an allow-list: the name is a key, never a path
            return PlainTextResponse("not found\n", status_code=404)
        data, packed, media = self.files[name]
        headers = {"Cache-Control": "private, max-age=86400", "Vary": "Accept-Encoding"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["Content-Encoding"] = "gzip"
            data = packed
        return Response(data, media_type=media, headers=headers)


def _int(value: str | None, default: int | None, low: int, high: int) -> int | None:
    if value is None or value in ("", "all"):
        return default
    if not re.fullmatch(r"-?\d{1,9}", value):
        raise ValueError(value)
    return max(low, min(high, int(value)))


def build_routes(index: RunIndex, static: StaticFiles) -> list[Route]:
    def run_or_404(request: Request) -> Run | None:
        return index.get(request.path_params["run_id"])

    def page(request: Request) -> Response:
        return Response(static.index, media_type=STATIC_TYPES[".html"], headers={"Cache-Control": "no-cache"})

    def static_file(request: Request) -> Response:
        return static.response(request, request.path_params["name"])

    def runs(request: Request) -> Response:
        return json_response(request, {"runs": [views.run_listing(r) for r in index.runs()]})

    def per_run(view: Callable[[Run, Request], Any]) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            run = run_or_404(request)
            if run is None:
                return PlainTextResponse("no such run\n", status_code=404)
            try:
                return json_response(request, view(run, request))
            except ValueError:
                return PlainTextResponse("bad query\n", status_code=400)

        return endpoint

    def clients(run: Run, request: Request) -> Any:
        q = request.query_params
        order = q.get("order", "asc")
        status = q.get("status") or None
        if order not in ("asc", "desc") or (status is not None and len(status) > 20):
            raise ValueError(order)
        return views.clients_page(
            run, _int(q.get("round"), None, 0, 10**9), status, q.get("sort", "round"), order == "desc",
            _int(q.get("offset"), 0, 0, 10**9) or 0, _int(q.get("limit"), 100, 1, views.PAGE_LIMIT) or 100,
        )  # fmt: skip

    return [
        Route("/", page, methods=["GET", "HEAD"]),
        Route("/static/{name}", static_file, methods=["GET", "HEAD"]),
        Route("/favicon.ico", lambda request: Response(status_code=204), methods=["GET", "HEAD"]),
        Route("/api/runs", runs, methods=["GET", "HEAD"]),
        Route("/api/runs/{run_id}", per_run(lambda run, _: views.overview(run)), methods=["GET", "HEAD"]),
        Route("/api/runs/{run_id}/rounds", per_run(lambda run, _: {"rounds": [views.round_row(r) for r in run.rounds()]}), methods=["GET", "HEAD"]),
        Route("/api/runs/{run_id}/clients", per_run(clients), methods=["GET", "HEAD"]),
        Route("/api/runs/{run_id}/privacy", per_run(lambda run, _: views.privacy(run)), methods=["GET", "HEAD"]),
        Route("/api/runs/{run_id}/offsite", per_run(lambda run, _: views.offsite(run)), methods=["GET", "HEAD"]),
        Route("/api/runs/{run_id}/config", per_run(lambda run, _: {"config": run.config()}), methods=["GET", "HEAD"]),
    ]


def host_name(header: str) -> str:
    """The host of a Host header: 'localhost:8050' -> 'localhost', '[::1]:8050' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """Refuses what never reaches a route: other methods, traversal, foreign Host, no token."""

    def __init__(self, app: ASGIApp, token: str | None, hosts: frozenset[str] | None, secure_cookie: bool) -> None:
        self.app, self.hosts, self.secure_cookie = app, hosts, secure_cookie
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)

    def refusal(self, scope: Scope) -> Response | None:
        if scope["method"] not in ("GET", "HEAD"):
            return PlainTextResponse("read-only: GET and HEAD only\n", status_code=405, headers={"Allow": "GET, HEAD"})
        raw = scope.get("raw_path") or scope["path"].encode()
        if not raw.startswith(b"/") or BAD_PATH.search(raw) or ".." in scope["path"] or "\0" in scope["path"]:
            return PlainTextResponse("refused: a path outside the dashboard\n", status_code=400)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.hosts is not None and host_name(headers.get(b"host", b"").decode("latin-1")) not in self.hosts:
            return PlainTextResponse("refused: unexpected Host header\n", status_code=400)
        if self.token is None:
            return None
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        offered = [v.encode() for v in query.get("token", [])[:1]]
        if offered and scope["path"] == "/" and hmac.compare_digest(offered[0], self.token):
            response = RedirectResponse("/", status_code=303)  # the token leaves the address bar and history
            response.set_cookie(COOKIE, self.token.decode(), httponly=True, secure=self.secure_cookie, samesite="strict", path="/")
            return response
        if self._authorized(headers):
            return None
        return PlainTextResponse("access token required: open the address the dashboard printed when it started\n", status_code=401)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self.token is not None
        candidates = []
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            candidates.append(auth[7:].strip())
        for part in headers.get(b"cookie", b"").split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name == COOKIE.encode():
                candidates.append(value)
        ok = False
        for candidate in candidates[:4]:
            ok |= hmac.compare_digest(candidate, self.token)
        return ok


def create_app(index: RunIndex, token: str | None = None, hosts: frozenset[str] | None = None, secure_cookie: bool = True) -> ASGIApp:
    """The dashboard over `index`'s runs; `token` required on every request when given, `hosts`
    the Host names accepted (None: any)."""
    static = StaticFiles()
    app = Starlette(routes=build_routes(index, static), middleware=[Middleware(GZipMiddleware, minimum_size=2048, compresslevel=5)])
    return Guard(app, token, hosts, secure_cookie)
