"""The device's warm worker: one long-lived process that runs the client's handlers for every message.

`fedsite client` starts it beside its SuperNode (`python -m client.worker --socket PATH
--owner-pid PID`); a forwarder starts it again when it finds none. It imports torch,
transformers and peft once, keeps `finetune.cache`'s backbone across rounds, and serves one
request at a time on an owner-only Unix socket (client/private_socket.py), in the wire format
of client/wire.py:

- `call`: set Flower's TaskIdentity, run the named handler of `client.handlers.HANDLERS` on the
  message and context, reply with its message and the context as the handler left it;
- `ping`: pid and uptime; `stats`: messages served and the model cache's counters.

Every request is checked: a peer running as another user is refused, a malformed or oversized
frame gets an error reply, and a handler that raises gets an error reply (one line, the
traceback goes to the log); nothing a peer sends ends the worker. The worker ends when its
owner process is gone, on SIGTERM/SIGINT, or when another worker already holds its folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from client.private_socket import PeerRefused, WorkerFiles, check_peer, listen, peer_credentials, private_folder, try_lock
from client.wire import (
    Call,
    ConnectionClosed,
    Reply,
    WireError,
    error_frame,
    info_frame,
    parse_request,
    recv_frame,
    reply_frame,
    send_frame,
)

log = logging.getLogger("fedsite.client.worker")

REQUEST_TIMEOUT = 120.0  # seconds for a whole request to arrive once connected
REPLY_TIMEOUT = 120.0  # seconds for the forwarder to take the whole reply
OWNER_POLL = 0.5
LOCK_PATIENCE = 1.0  # seconds: outlasts a forwarder's test of the lock, not a live worker

Handler = Callable[..., object]


class Worker:
    """Serves requests on a listening socket, one at a time, with `handlers` by name."""

    def __init__(self, handlers: Mapping[str, Handler], stats: Callable[[], dict] | None = None, uid: int | None = None):
        self.handlers = dict(handlers)
        self.extra_stats = stats or (lambda: {})
        self.uid = os.getuid() if uid is None else uid
        self.started = time.time()
        self.messages = 0
        self.refused = 0

    def serve(self, server: socket.socket) -> None:
        """Serve until the server socket is closed; a failed accept (out of descriptors, ...) is retried."""
        while True:
            try:
                self.serve_one(server)
            except OSError as err:
                if server.fileno() == -1:
                    return
                log.warning("[fedsite] worker: accept failed (%s); retrying", err)
                time.sleep(0.1)

    def serve_one(self, server: socket.socket) -> None:
        """Accept one connection, answer its request, close it."""
        conn, _ = server.accept()
        with conn:
            self.serve_connection(conn)

    def serve_connection(self, conn: socket.socket) -> None:
        try:
            peer = check_peer(peer_credentials(conn), self.uid)
        except (PeerRefused, OSError) as err:
            self.refused += 1
            log.warning("[fedsite] worker: %s", err)
            return
        try:
            frame = recv_frame(conn, time.monotonic() + REQUEST_TIMEOUT)
        except WireError as err:
            log.warning("[fedsite] worker: malformed request from pid %d: %s", peer, err)
            self._send(conn, error_frame(f"malformed request: {err}"))
            return
        except (TimeoutError, ConnectionClosed, OSError) as err:
            log.warning("[fedsite] worker: no whole request from pid %d (%s)", peer, type(err).__name__)
            return
        self._send(conn, self.answer(frame))

    def answer(self, frame) -> bytes:
        """The reply frame to one decoded request frame (never raises on bad input)."""
        try:
            request = parse_request(frame)
        except WireError as err:
            log.warning("[fedsite] worker: malformed request: %s", err)
            return error_frame(f"malformed request: {err}")
        if request == "ping":
            return info_frame({"pid": os.getpid(), "uptime": time.time() - self.started})
        if request == "stats":
            return info_frame(self.stats())
        return self.call(request)

    def call(self, call: Call) -> bytes:
        handler = self.handlers.get(call.handler)
        if handler is None:
            return error_frame(f"no handler {call.handler!r} (known: {', '.join(sorted(self.handlers))})")
        set_task_identity(call.task)
        started = time.perf_counter()
        try:
            reply = handler(call.message, call.context)
        except Exception as err:  # the handler's failure is the message's, never the worker's
            log.exception("[fedsite] worker: %s raised", call.handler)
            return error_frame(f"{call.handler} raised {type(err).__name__}: {err}")
        seconds = time.perf_counter() - started
        self.messages += 1
        try:
            return reply_frame(Reply(reply, call.context, seconds))
        except Exception as err:  # noqa: BLE001 (a reply Flower cannot deflate, or one too large)
            log.exception("[fedsite] worker: %s's reply cannot be sent", call.handler)
            return error_frame(f"{call.handler}'s reply cannot be sent: {type(err).__name__}: {err}")

    def stats(self) -> dict:
        return {"pid": os.getpid(), "uptime": time.time() - self.started, "messages": self.messages, "refused": self.refused, **self.extra_stats()}

    @staticmethod
    def _send(conn: socket.socket, frame: bytes) -> None:
        try:
            send_frame(conn, frame, time.monotonic() + REPLY_TIMEOUT)
        except OSError as err:
            log.warning("[fedsite] worker: the forwarder left before the reply (%s)", type(err).__name__)


def set_task_identity(task: tuple[int | None, int | None, int | None]) -> None:
    """Flower's TaskIdentity of the forwarder's task (a Message created in a handler reads it)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = task


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch_owner(owner_pid: int, on_gone: Callable[[], None]) -> None:
    """Call `on_gone` (in a daemon thread) once the owner process has exited; at once if it is gone."""
    import psutil

    try:
        owner = psutil.Process(owner_pid)  # is_running() also tells a reused pid from the owner
    except psutil.Error:
        on_gone()
        return

    def watch() -> None:
        while owner.is_running() and alive(owner_pid):
            time.sleep(OWNER_POLL)
        on_gone()

    threading.Thread(target=watch, name="owner-watch", daemon=True).start()


def fedsite_handlers() -> tuple[dict[str, Handler], Callable[[], dict]]:
    """The client's handlers (the heavy imports) and the model cache's counters."""
    from client.handlers import HANDLERS
    from finetune import cache

    def stats() -> dict:
        return {"cache": cache._build.cache_info()._asdict()}

    return HANDLERS, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.worker", description="Fedsite's warm client worker (started by `fedsite client`).")
    parser.add_argument("--socket", required=True, help="the Unix socket to serve, in an owner-only folder")
    parser.add_argument("--owner-pid", type=int, required=True, help="exit when this process has exited")
    args = parser.parse_args(argv)
    from finetune.logs import setup_logging

    setup_logging()
    files = WorkerFiles(Path(args.socket).expanduser().absolute())
    private_folder(files.folder)
    lock = try_lock(files.worker_lock, patience=LOCK_PATIENCE)  # before anything slow: a second worker leaves at once
    if lock is None:
        log.info("[fedsite] worker: another worker serves %s; exiting", files.socket)
        return 0

    if not alive(args.owner_pid):
        log.error("[fedsite] worker: owner pid %d is not running; exiting", args.owner_pid)
        return 3

    def owner_gone() -> None:
        log.info("[fedsite] worker %d: owner pid %d is gone; exiting", os.getpid(), args.owner_pid)
        _remove(files.socket)
        os._exit(0)

    watch_owner(args.owner_pid, owner_gone)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.perf_counter()
    handlers, stats = fedsite_handlers()
    imports = time.perf_counter() - started
    worker = Worker(handlers, lambda: {**stats(), "import-seconds": imports})
    server = listen(files.socket)
    log.info("[fedsite] worker %d: serving %s (imports %.1fs, owner pid %d)", os.getpid(), files.socket, imports, args.owner_pid)
    try:
        worker.serve(server)
    except KeyboardInterrupt:
        return 130
    finally:
        server.close()
        _remove(files.socket)
        log.info("[fedsite] worker %d: stopped after %d message(s)", os.getpid(), worker.messages)
    return 0


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


if __name__ == "__main__":
    sys.exit(main())
