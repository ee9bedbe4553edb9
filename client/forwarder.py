"""The per-message side of a deployed client: hand one message to the device's warm worker.

`fedsite client` runs every ClientApp task in one long-lived executor (client/executor.py);
Flower's own SuperExec (other set-ups) starts a fresh `flwr-clientapp` process for every
message. Either way, when the node config names a worker socket (`worker-socket`, set by
`fedsite client`), the ClientApp's handler calls `forward`: it connects to the worker
(starting it if none runs), sends the message, the context and Flower's TaskIdentity, and
returns the worker's reply, with the context's state updated in place (Flower pushes the
context back after the app returns).

Failures are bounded and say what happened in one line, which Flower turns into the error
reply the coordinator records:
- no worker (no socket, or a dead worker's socket): start one, detached, with this Python,
  under `start.lock` so two forwarders start one between them, and wait for it
  (START_TIMEOUT: the worker imports torch, transformers and peft first);
- the worker dies mid-message, or does not answer within the round's `round-timeout`: stop
  what is left of it and raise; the next message starts a fresh worker.

One line per message on stderr (which ends up in the SuperNode's output) measures the
forwarder's own cost: `[fedsite] forwarder train: started 0.92s before handoff, worker 0.31s
(handler 0.30s; forwarder imported 0.60s after start)` - from the process's start (as the OS
says) to the moment it hands the message over, the worker's round trip, the handler's share of
it, and when this module had been imported (what came before is Flower's own start-up). In
the executor, the start is the moment it claimed the task.

Imports: flwr, numpy (through flwr) and the stdlib only, so that this process stays light.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from flwr.app import Context, Message
from flwr.supercore.task_identity import TaskIdentity

from client.private_socket import WorkerFiles, connect, lock_held, locked, private_file, private_folder
from client.wire import Call, ConnectionClosed, Reply, WireError, call_frame, parse_reply, recv_frame, request_frame, send_frame

SOCKET_KEY = "worker-socket"  # node config: the worker's socket; its presence means "deployed, forward"
OWNER_KEY = "worker-owner-pid"  # node config: the process whose exit ends the worker (`fedsite client`)
TIMEOUT_KEY = "round-timeout"  # run config, in the message's ConfigRecord
DEFAULT_TIMEOUT = 3600.0  # seconds for a message without a round-timeout (FedsiteConfig's default)
MAX_TIMEOUT = 7 * 24 * 3600.0
START_TIMEOUT = 120.0  # seconds for a new worker to answer (its imports take ~20 s on a small device)
CONNECT_TIMEOUT = 10.0
STOP_GRACE = 5.0
MAX_LOG_BYTES = 8 << 20  # a worker's log above this is moved to worker.log.1 when a worker starts
IMPORTED = time.time()  # when this module was imported (the measurement line reports it)
_ACQUIRED: contextvars.ContextVar[float | None] = contextvars.ContextVar("fedsite_task_acquired", default=None)


def forward(handler: str, message: Message, context: Context) -> Message:
    """Run `handler` on the device's worker: its reply message; `context.state` becomes the worker's."""
    files = WorkerFiles(Path(str(context.node_config[SOCKET_KEY])))
    timeout = message_timeout(message)
    # first: a message the wire cannot carry (over MAX_FRAME_BYTES) is this message's error, not the worker's
    frame = call_frame(Call(handler, message, context, (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)))
    sock, peer, spawned = connect_or_start(files, owner_pid(context.node_config))
    handoff, sent = time.time(), time.monotonic()  # from here on, the worker's time
    try:
        with sock:
            send_frame(sock, frame, sent + timeout)
            answer = parse_reply(recv_frame(sock, sent + timeout))
    except TimeoutError:
        stop_worker(peer, files)
        raise RuntimeError(f"fedsite worker (pid {peer}) did not answer {handler} within {timeout:.0f}s; stopped it, the next message starts a new one: see {files.log}") from None
    except (ConnectionClosed, ConnectionError) as err:
        code = _exit_code(spawned, peer)
        stop_worker(peer, files)  # what is left of it: the next message finds no half-dead listener
        raise RuntimeError(f"fedsite worker died while handling {handler} ({code}): see {files.log}") from err
    except WireError as err:
        stop_worker(peer, files)
        raise RuntimeError(f"fedsite worker sent a malformed reply to {handler} ({err}); stopped it: see {files.log}") from None
    round_trip = time.monotonic() - sent
    if isinstance(answer, str):
        raise RuntimeError(f"fedsite worker: {answer}")
    if not isinstance(answer, Reply):
        raise RuntimeError(f"fedsite worker answered {handler} with something other than a reply")
    if answer.message.metadata.reply_to_message_id != message.metadata.message_id:
        raise RuntimeError(f"fedsite worker's reply to {handler} answers another message")
    context.state = answer.context.state  # what the handler (and any mod) left there travels back to Flower
    task_start = _ACQUIRED.get()
    if task_start is None:  # a process of its own (Flower's flwr-clientapp): from the process's start
        started = process_started()
        where = f"forwarder imported {IMPORTED - started:.2f}s after start"
    else:  # the device's long-lived executor (client/executor.py): from the task's claim
        started, where = task_start, "in the executor, from the task's claim"
    print(
        f"[fedsite] forwarder {handler}: started {handoff - started:.2f}s before handoff, worker {round_trip:.2f}s "
        f"(handler {answer.seconds:.2f}s; {where})",
        file=sys.stderr, flush=True,
    )
    return answer.message


@contextlib.contextmanager
def acquired_at(when: float) -> Iterator[None]:
    """While in it, messages forwarded on this thread count their start from `when` (the moment
    the device's executor claimed the task) instead of from this process's start."""
    token = _ACQUIRED.set(when)
    try:
        yield
    finally:
        _ACQUIRED.reset(token)


def request(files: WorkerFiles, kind: str, timeout: float = CONNECT_TIMEOUT) -> dict:
    """Ask a running worker for `ping` or `stats` (no start): its info dict."""
    deadline = time.monotonic() + timeout
    sock, _ = connect(files.socket, timeout)
    with sock:
        send_frame(sock, request_frame(kind), deadline)
        answer = parse_reply(recv_frame(sock, deadline))
    if not isinstance(answer, dict):
        raise RuntimeError(f"fedsite worker: {answer}")
    return answer


def message_timeout(message: Message) -> float:
    """The round's `round-timeout` from the message's config, else DEFAULT_TIMEOUT (bounded)."""
    value = None
    if message.has_content() and "config" in message.content.config_records:
        value = message.content.config_records["config"].get(TIMEOUT_KEY)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return min(float(value), MAX_TIMEOUT)
    return DEFAULT_TIMEOUT


def owner_pid(node_config: Mapping) -> int:
    """The process a started worker lives for: `fedsite client` (node config), else our parent (the SuperExec)."""
    value = node_config.get(OWNER_KEY)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else os.getppid()


def connect_or_start(files: WorkerFiles, owner: int, start_timeout: float = START_TIMEOUT) -> tuple[socket.socket, int, subprocess.Popen | None]:
    """A connection to the worker and its pid, starting a worker if none runs; and the process
    this call started (None if it found one running or starting).

    A live or starting worker holds `worker.lock`; one still exiting holds it a moment longer.
    While it is held, wait; once it is free, start a worker (under `start.lock`).
    """
    try:
        return (*connect(files.socket, CONNECT_TIMEOUT), None)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    private_folder(files.folder)
    started, spawned = time.monotonic(), None
    deadline = started + start_timeout
    while True:
        if spawned is not None and spawned.poll() not in (None, 0):  # 0: it found another worker starting
            raise RuntimeError(f"fedsite worker failed to start (exit {spawned.returncode}): see {files.log}")
        if not lock_held(files.worker_lock):
            spawned = _start_unless_running(files, owner, deadline) or spawned
        try:
            sock, pid = connect(files.socket, CONNECT_TIMEOUT)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        else:
            if spawned is not None:
                print(f"[fedsite] forwarder: started the worker (pid {spawned.pid}) in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
            return sock, pid, spawned
        if time.monotonic() > deadline:
            raise RuntimeError(f"fedsite worker did not answer within {start_timeout:.0f}s of its start: see {files.log}")
        time.sleep(0.1)


def _start_unless_running(files: WorkerFiles, owner: int, deadline: float) -> subprocess.Popen | None:
    """Under `start.lock`: start a worker if none holds `worker.lock`, and wait until it does."""
    try:
        with locked(files.start_lock, max(0.0, deadline - time.monotonic())):
            if lock_held(files.worker_lock):
                return None  # another forwarder started one meanwhile
            spawned = start_worker(files, owner, detach=True)
            while not lock_held(files.worker_lock) and spawned.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            return spawned
    except TimeoutError as err:
        raise RuntimeError(f"fedsite worker could not be started: {err}; see {files.log}") from None


def worker_command(files: WorkerFiles, owner: int) -> list[str]:
    """The worker's command line: this Python, the module `client.worker`."""
    return [sys.executable, "-m", "client.worker", "--socket", str(files.socket), "--owner-pid", str(owner)]


def start_worker(files: WorkerFiles, owner: int, env: Mapping[str, str] | None = None, detach: bool = True) -> subprocess.Popen:
    """Start a worker whose output goes to its owner-only log (rotated once past MAX_LOG_BYTES);
    `detach` puts it in a session of its own, so that it outlives the process that started it."""
    private_folder(files.folder)
    try:
        if os.lstat(files.log).st_size > MAX_LOG_BYTES:
            os.replace(files.log, files.log.with_name(files.log.name + ".1"))  # one old log kept
    except FileNotFoundError:
        pass
    log_fd = private_file(files.log, os.O_WRONLY | os.O_APPEND)
    try:
        return subprocess.Popen(
            worker_command(files, owner), stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            cwd=files.folder, env=None if env is None else dict(env), start_new_session=detach, close_fds=True,
        )
    finally:
        os.close(log_fd)


def stop_worker(pid: int, files: WorkerFiles, grace: float = STOP_GRACE) -> None:
    """Stop the worker with this pid (SIGTERM, then SIGKILL) if that pid still is a Fedsite
    worker, and wait until its `worker.lock` is free: then its socket is closed too, and the
    next message starts a new worker instead of reaching one that is half gone."""
    import psutil  # noqa: PLC0415 (only on failure paths)

    try:
        proc = psutil.Process(pid) if pid > 0 else None
        if proc is not None and "client.worker" in proc.cmdline():  # else: the pid was reused
            proc.send_signal(signal.SIGCONT)  # a stopped process ignores SIGTERM until continued
            proc.terminate()
            if _released(files, grace):
                return
            proc.kill()
    except psutil.Error:  # gone, or exiting right now (a zombie whose last threads still run)
        pass
    _released(files, grace)


def stop_worker_at(files: WorkerFiles, grace: float = STOP_GRACE) -> None:
    """Stop the worker listening on `files.socket`, if one does (the kernel names its pid at connect,
    so a busy worker is found too)."""
    try:
        sock, pid = connect(files.socket, CONNECT_TIMEOUT)
    except OSError:
        return
    sock.close()
    stop_worker(pid, files, grace)


def _released(files: WorkerFiles, timeout: float) -> bool:
    """Wait until no process holds `worker.lock` (a worker holds it until its last thread exits)."""
    deadline = time.monotonic() + timeout
    while lock_held(files.worker_lock):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def process_started() -> float:
    """When this process was created (seconds since the epoch), as the OS says."""
    import psutil  # noqa: PLC0415 (light, but not needed by the simulation path)

    return psutil.Process().create_time()


def _exit_code(spawned: subprocess.Popen | None, pid: int) -> str:
    if spawned is not None and spawned.pid == pid:
        try:
            return f"exit {spawned.wait(STOP_GRACE)}"
        except subprocess.TimeoutExpired:
            return f"pid {pid}, still running"
    return f"pid {pid}"


def import_seconds(module: str = "client.client_app", python: str = sys.executable, env: Mapping[str, str] | None = None) -> float:
    """Seconds a fresh Python takes to import `module` (the forwarder's import cost per message)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, env=None if env is None else dict(env))
    return float(out.stdout.strip().splitlines()[-1])
