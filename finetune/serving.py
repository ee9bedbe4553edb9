"""Serving an ASGI app from a daemon thread of this process: the coordinator's gateway and the dashboard.

`listen` binds the socket in the caller (a busy port is an immediate one-line error, and port 0
picks a free one); `serve_in_thread` runs uvicorn on it in a daemon thread and returns once it
answers, so the server dies with the process and no orphan holds the port. `is_loopback` is the
one test of "this address stays on this machine" behind every "TLS off loopback" rule.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

STARTUP_SECONDS = 30.0


def is_loopback(host: str) -> bool:
    """Whether HOST (a name or an IP, IPv6 with or without brackets) stays on this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int, what: str, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on host:port, not inherited by child processes; OSError in one line naming `what`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as err:
        raise OSError(f"{what}: cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.set_inheritable(False)
    return sock


@dataclass
class ThreadedServer:
    """A uvicorn server running in a daemon thread; `stop()` shuts it down gracefully, then forcibly."""

    server: object  # uvicorn.Server
    thread: threading.Thread
    port: int

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():  # open streams past the grace period
            self.server.force_exit = True
            self.thread.join(timeout)


def serve_in_thread(config: object, sock: socket.socket, name: str) -> ThreadedServer:
    """Run `uvicorn.Server(config)` on `sock` in a daemon thread named `name`; return once it has started."""
    import uvicorn

    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise OSError(f"{name}: uvicorn did not start on port {sock.getsockname()[1]}")
        time.sleep(0.05)
    return ThreadedServer(server, thread, sock.getsockname()[1])
