"""Binding and starting the dashboard: loopback by default; off loopback only with TLS and a token.

`start_dashboard` serves it from a daemon thread beside a run (`fedsite simulate --dashboard`,
`fedsite coordinator --dashboard`): the socket is bound in the caller's thread, so a busy port is
an immediate one-line error, and the server dies with the run's process. `serve_dashboard` serves
it in the foreground until Ctrl-C (`fedsite dashboard`). Off loopback the token is random
(`secrets.token_urlsafe`), printed once in the start line and nowhere else; uvicorn's access log
is off, so the `?token=` of the first request is not logged either.
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from dashboard import DEFAULT_ADDRESS
from dashboard.app import create_app
from dashboard.runs import DashboardError, RunIndex
from finetune.serving import ThreadedServer, is_loopback, listen, serve_in_thread

log = logging.getLogger("fedsite.dashboard")

CERT_FILE, KEY_FILE = "server.pem", "server.key"  # the layout of `fedsite certs --out DIR`
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def parse_address(value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets); port 0 picks a free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise DashboardError(f"dashboard address '{value}' must be HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    return host.strip("[]"), int(port)


def tls_files(certs: str | Path | None) -> tuple[Path, Path] | None:
    """(certificate, key) from a `fedsite certs` folder, checked; None without one."""
    if certs is None:
        return None
    folder = Path(certs).expanduser().resolve()
    files = (folder / CERT_FILE, folder / KEY_FILE)
    for path in files:
        if not path.is_file():
            raise DashboardError(f"dashboard TLS: '{path}' does not exist (expected {CERT_FILE} and {KEY_FILE}, as `fedsite certs --out DIR` writes)")
    return files


@dataclass
class Dashboard:
    serving: ThreadedServer
    url: str
    token: str | None
    index: RunIndex

    def stop(self) -> None:
        self.serving.stop()
        self.index.close()


def prepare(folders: Sequence[str | Path], address: str, certs: str | Path | None, live: Sequence[str | Path] = ()) -> tuple[uvicorn.Server, socket.socket, str, str | None, RunIndex]:
    """Check everything and bind the socket: (server, socket, URL, token, index)."""
    host, port = parse_address(address)
    tls = tls_files(certs)
    loopback = is_loopback(host)
    if not loopback and tls is None:
        raise DashboardError(f"dashboard on '{address}' is off loopback: it needs TLS (a certificate folder: --certs for the coordinator, --dashboard-certs otherwise), or serve it on 127.0.0.1")
    token = None if loopback else secrets.token_urlsafe(32)
    index = RunIndex(folders, live)
    app = create_app(index, token=token, hosts=LOOPBACK_HOSTS | {host.lower()} if loopback else None, secure_cookie=tls is not None)
    try:
        sock = listen(host, port, "dashboard")
    except OSError as err:
        index.close()
        raise DashboardError(str(err)) from None
    bound = sock.getsockname()[1]
    shown = "localhost" if host in ("127.0.0.1", "localhost") else (f"[{host}]" if ":" in host else host)
    url = f"{'https' if tls else 'http'}://{shown}:{bound}/" + (f"?token={token}" if token else "")
    config = uvicorn.Config(
        app, ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None, lifespan="off",
        log_level="warning", access_log=False, server_header=False, proxy_headers=False, timeout_keep_alive=30,
        timeout_graceful_shutdown=2,
    )  # fmt: skip
    return uvicorn.Server(config), sock, url, token, index


def start_dashboard(folders: Sequence[str | Path], address: str = DEFAULT_ADDRESS, certs: str | Path | None = None, live: Sequence[str | Path] = ()) -> Dashboard:
    """Serve the dashboard from a daemon thread; `live` folders are runs even before their first file."""
    server, sock, url, token, index = prepare(folders, address, certs, live)
    try:
        serving = serve_in_thread(server.config, sock, "fedsite-dashboard")
    except OSError as err:
        index.close()
        raise DashboardError(f"dashboard: {err}") from None
    return Dashboard(serving, url, token, index)


def _print(line: str) -> None:
    print(line, flush=True)


def serve_dashboard(folders: Sequence[str | Path], address: str = DEFAULT_ADDRESS, certs: str | Path | None = None, announce: Callable[[str], None] = _print) -> None:
    """Serve in the foreground until interrupted; `announce` gets the one start line (with the token)."""
    server, sock, url, token, index = prepare(folders, address, certs)
    runs = index.runs()
    what = "TLS, token required" if token else "loopback only"
    announce(f"dashboard: {url}  ({len(runs)} run{'s' if len(runs) != 1 else ''}; {what}; read-only; Ctrl-C stops it)")
    try:
        server.run(sockets=[sock])
    finally:
        index.close()


def announce_line(url: str, token: str | None) -> str:
    what = "TLS, token required" if token else "loopback only"
    return f"dashboard: {url}  ({what}; read-only; it stops with the run)"
