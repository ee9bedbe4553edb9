"""The device's task loop: every ClientApp task runs in one long-lived process, not one process each.

Flower's SuperNode normally starts `flower-superexec`, which claims each ClientApp task from the
SuperNode's local Runtime API and starts a fresh `flwr-clientapp` process for it: Python and
flwr start again for every message (seconds per message on a small device, and the bulk of a
networked round). `fedsite client` starts its SuperNode with `--isolation process` instead
(Flower's mode for an executor outside the SuperNode) and runs `run_executor` on a thread of
the SuperNode's own process (client/supernode.py):

- it claims tasks with Flower's `AcquireTask`, signed with the SuperNode's SuperExec secret
  (an owner-only file written at each start), so no other local process can claim them;
- each task is Flower's `flwr-clientapp` sequence, in-process: pull the message, context and
  run (`pull_task_input`), call the Fedsite ClientApp, push the reply (`push_message`) and the
  context (`push_task_output`). The ClientApp forwards to the warm worker (client/forwarder.py);
- the ClientApp is the one installed on the device (`client.client_app.app`), never code from
  the run's FAB: a run submitted by anyone executes no foreign code on the device. A run's FAB
  is named in the log once;
- a failing task becomes Flower's error reply (the coordinator records it) and the loop goes on.

Imports: flwr and the stdlib only (no torch): this process stays light.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path

from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from client import forwarder
from client.private_socket import private_file
from finetune.processes import quick_object_pulls

log = logging.getLogger("fedsite.executor")

TASK_POLL_SECONDS = 0.05  # loopback AcquireTask requests: a task waits at most this long (Flower's SuperExec: 1 s)
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
SECRET_BYTES = 32


def write_secret(path: str | Path) -> bytes:
    """A fresh SuperExec secret in an owner-only file (replacing an old one): the SuperNode
    accepts `AcquireTask` only when signed with it."""
    path = Path(path)
    secret = secrets.token_bytes(SECRET_BYTES)
    path.unlink(missing_ok=True)
    fd = private_file(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, secret)
    finally:
        os.close(fd)
    return secret


def task_client(address: str, token: str) -> RuntimeHttpClient:
    """The Runtime API client of one task, as Flower's flwr-clientapp builds it."""
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,  # loopback, inside the device
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker(),
    )


def heartbeat(client: RuntimeHttpClient, cancelled: threading.Event):  # noqa: ANN201 (Callable[[], bool])
    """The task's heartbeat. Flower's own raises SIGINT when the SuperNode says the task is gone,
    which would end this whole process; here it only marks the task cancelled."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            alive = client.SendTaskHeartbeat(request).success
        except Exception:  # noqa: BLE001 (a missed beat is retried by HeartbeatSender)
            return False
        if not alive:
            cancelled.set()
        return True

    return beat


def run_task(address: str, token: str, fabs_seen: set[str] | None = None) -> str:
    """Run one ClientApp task in this process: its final status (Flower's SubStatus)."""
    from client.client_app import app  # noqa: PLC0415 (flwr and numpy only; first task only)

    acquired = time.time()
    client, cancelled = task_client(address, token), threading.Event()
    beats = HeartbeatSender(heartbeat(client, cancelled))
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        beats.start()
        message, context, run, fab = pull_task_input(client)
        pulled = time.time()
        if fabs_seen is not None and fab.hash_str not in fabs_seen:
            fabs_seen.add(fab.hash_str)
            log.info("[fedsite] run %s (%s %s): its FAB %s is not executed; the installed Fedsite ClientApp answers", run.run_id, run.fab_id, run.fab_version, fab.hash_str[:12])
        with forwarder.acquired_at(acquired):
            reply = app(message=message, context=context)
        answered = time.time()
        status, details = SubStatus.COMPLETED, ""
    except Exception as err:  # noqa: BLE001 (one failing task is that message's error reply, never the loop's end)
        reason = f"{type(err)}:<'{err}'>"  # Flower's own format (run_clientapp.py)
        log.error("[fedsite] ClientApp task failed: %s", err)
        details = reason
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None and not cancelled.is_set():
                push_message(client, reply, context)
        except Exception as err:  # noqa: BLE001
            log.error("[fedsite] could not push the reply: %s", err)
            status, details = SubStatus.FAILED, f"reply not delivered: {err}"
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if status == SubStatus.COMPLETED:
            print(f"[fedsite] executor task: pulled {pulled - acquired:.2f}s, ClientApp {answered - pulled:.2f}s, pushed {time.time() - answered:.2f}s", file=sys.stderr, flush=True)
        if beats.is_running:
            beats.stop()
        client.close()
    return status


def run_executor(address: str, secret: bytes, stop: threading.Event, poll: float = TASK_POLL_SECONDS) -> None:
    """Claim and run ClientApp tasks one at a time until `stop` is set. A task is claimable while
    the SuperNode still pulls its message's objects from the coordinator: the task's own pull
    retries within 0.05-0.5 s (Flower's waits 1 s, then 2 s more, ...)."""
    quick_object_pulls(run_clientapp, "pull_and_inflate_object_from_tree")
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD})],
    )
    request, fabs_seen, warned = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]), set(), 0.0
    try:
        while not stop.is_set():
            try:
                answer = client.AcquireTask(request)
            except Exception as err:  # noqa: BLE001 (the SuperNode's API not up yet, or restarting)
                if time.monotonic() - warned > 60:
                    log.debug("[fedsite] executor: Runtime API at %s not answering (%s); retrying", address, err)
                    warned = time.monotonic()
                stop.wait(max(poll, 0.5))
                continue
            if answer.HasField("task") and answer.token:
                try:
                    run_task(address, answer.token, fabs_seen)
                except Exception as err:  # noqa: BLE001 (e.g. the SuperNode gone mid-task: the loop itself must not end)
                    log.error("[fedsite] executor: task ended abnormally: %s", err)
                continue  # another task may be waiting
            stop.wait(poll)
    finally:
        client.close()


def start_executor(address: str, secret: bytes, poll: float = TASK_POLL_SECONDS) -> threading.Event:
    """`run_executor` on a daemon thread of this process; set the returned event to stop it."""
    stop = threading.Event()
    threading.Thread(target=run_executor, args=(address, secret, stop, poll), name="fedsite-executor", daemon=True).start()
    return stop
