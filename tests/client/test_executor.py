"""The device's long-lived task loop (client/executor.py), with Flower's Runtime API stood in for.

The real loop against a real SuperNode runs in the networked end-to-end tests."""

from __future__ import annotations

import os
import signal
import stat
import threading
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SubStatus
from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
from flwr.supercore.task_identity import TaskIdentity

from client import client_app, executor, forwarder


class FakeRuntime:
    """What a task's Runtime API client is asked, in order."""

    def __init__(self, tasks: list[str] | None = None) -> None:
        self.calls, self.tasks, self.closed = [], list(tasks or []), False

    def SendTaskHeartbeat(self, request):  # noqa: N802 (Flower's RPC name)
        self.calls.append("heartbeat")
        return SimpleNamespace(success=True)

    def AcquireTask(self, request):  # noqa: N802
        self.calls.append(("acquire", list(request.supported_task_types)))
        token = self.tasks.pop(0) if self.tasks else ""
        return SimpleNamespace(HasField=lambda field: bool(token), token=token)

    def close(self) -> None:
        self.closed = True


def _message() -> tuple[Message, Context]:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 3, 1, 7  # as Flower's pull_task_input sets them
    msg = Message(RecordDict(), dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m1"
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    return msg, context


@pytest.fixture
def task(monkeypatch):
    """run_task with Flower's pull/push stood in for; returns what was pushed."""
    runtime, pushed = FakeRuntime(), {}
    message, context = _message()
    run = SimpleNamespace(run_id=1, fab_id="fedsite/fedsite", fab_version="0.1.0")
    monkeypatch.setattr(executor, "task_client", lambda address, token: runtime)
    monkeypatch.setattr(executor, "pull_task_input", lambda client: (message, context, run, SimpleNamespace(hash_str="ab" * 32)))
    monkeypatch.setattr(executor, "push_message", lambda client, reply, ctx: pushed.setdefault("reply", reply))
    monkeypatch.setattr(executor, "push_task_output", lambda client, context, sub_status, details: pushed.update(status=sub_status, details=details, context=context))
    return SimpleNamespace(runtime=runtime, pushed=pushed, message=message, context=context)


def test_a_task_runs_the_installed_clientapp_in_this_process_and_pushes_reply_and_context(task, monkeypatch):
    seen = {}

    def app(message, context):
        seen["pid"], seen["acquired"] = os.getpid(), forwarder._ACQUIRED.get()
        context.state["touched"] = ConfigRecord({"x": 1})  # what the handler leaves in the state travels back
        return Message(RecordDict(), reply_to=message)

    monkeypatch.setattr(client_app, "app", app)
    fabs: set[str] = set()
    assert executor.run_task("127.0.0.1:1", "token", fabs) == SubStatus.COMPLETED
    assert seen["pid"] == os.getpid() and seen["acquired"] is not None  # in-process; overhead counted from the claim
    assert forwarder._ACQUIRED.get() is None  # reset after the task
    assert task.pushed["status"] == SubStatus.COMPLETED and task.pushed["context"].state["touched"]["x"] == 1
    assert task.pushed["reply"].metadata.reply_to_message_id == "m1"
    assert fabs == {"ab" * 32} and task.runtime.closed


def test_a_failing_task_is_an_error_reply_and_the_loop_survives(task, monkeypatch):
    def app(message, context):
        raise RuntimeError("fedsite worker died while handling train (exit -9)")

    monkeypatch.setattr(client_app, "app", app)
    assert executor.run_task("127.0.0.1:1", "token") == SubStatus.FAILED
    reply = task.pushed["reply"]
    assert reply.has_error() and "worker died while handling train" in reply.error.reason
    assert task.pushed["status"] == SubStatus.FAILED and "worker died" in task.pushed["details"]


def test_a_cancelled_task_ends_quietly_instead_of_signalling_the_supernode(monkeypatch):
    raised = []
    monkeypatch.setattr(signal, "raise_signal", raised.append)
    cancelled = threading.Event()
    runtime = SimpleNamespace(SendTaskHeartbeat=lambda request: SimpleNamespace(success=False))
    assert executor.heartbeat(runtime, cancelled)() is True
    assert cancelled.is_set() and raised == []  # Flower's own heartbeat would SIGINT this whole process


def test_the_loop_claims_client_tasks_with_the_secret_and_runs_each(monkeypatch):
    runtime, built, ran = FakeRuntime(["t1", "t2"]), {}, []
    stop = threading.Event()

    def build(server_address, insecure, root_certificates, interceptors, retry_invoker=None):
        built.update(address=server_address, insecure=insecure, interceptors=interceptors)
        return runtime

    def run_task(address, token, fabs):
        ran.append(token)
        if len(ran) == 2:
            stop.set()
        return SubStatus.COMPLETED

    monkeypatch.setattr(executor.RuntimeHttpClient, "from_server_address", staticmethod(build))
    monkeypatch.setattr(executor, "run_task", run_task)
    executor.run_executor("127.0.0.1:9094", b"s" * 32, stop, poll=0.01)
    assert ran == ["t1", "t2"] and built["address"] == "127.0.0.1:9094" and built["insecure"]
    assert any(isinstance(i, SuperExecAuthHttpInterceptor) for i in built["interceptors"])  # claims are signed
    assert runtime.calls[0] == ("acquire", ["flwr-clientapp"]) and runtime.closed


def test_the_secret_is_fresh_and_owner_only(tmp_path):
    path = tmp_path / "superexec.secret"
    first = executor.write_secret(path)
    assert len(first) == executor.SECRET_BYTES and path.read_bytes() == first
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert executor.write_secret(path) != first  # a new one at every start


def test_object_pulls_retry_quickly_and_only_flowers_functions_are_patched():
    from types import ModuleType

    from flwr.supercore.inflatable import inflatable_utils

    from finetune.processes import PULL_BACKOFF_SECONDS, quick_object_pulls

    module = ModuleType("stand_in")
    module.pull_objects = inflatable_utils.pull_objects
    quick_object_pulls(module)
    quick_object_pulls(module)  # twice is once
    assert module.pull_objects.func is inflatable_utils.pull_objects
    assert module.pull_objects.keywords["initial_backoff"] == PULL_BACKOFF_SECONDS < 1.0
    module.pull_objects = lambda *a, **k: None
    with pytest.raises(RuntimeError, match="differs"):
        quick_object_pulls(module)


def test_the_loop_outlives_a_task_that_ends_abnormally(monkeypatch):
    runtime, ran, stop = FakeRuntime(["t1", "t2"]), [], threading.Event()
    monkeypatch.setattr(executor.RuntimeHttpClient, "from_server_address", staticmethod(lambda *a, **k: runtime))

    def run_task(address, token, fabs):
        ran.append(token)
        if token == "t1":
            raise ConnectionError("the SuperNode went away mid-task")
        stop.set()

    monkeypatch.setattr(executor, "run_task", run_task)
    executor.run_executor("127.0.0.1:9094", b"s" * 32, stop, poll=0.01)
    assert ran == ["t1", "t2"]
