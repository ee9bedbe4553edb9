"""The forwarder's contract with Flower, against a Worker served from a thread over a real
socket (the handlers here are small stand-ins; tests/client/test_worker.py runs the real ones in
a real worker process): the context's state comes back in place, handler failures are one-line
errors, the task identity reaches the handler, timeouts come from the round's config."""

import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import forwarder
from client.forwarder import DEFAULT_TIMEOUT, OWNER_KEY, SOCKET_KEY, forward, message_timeout, owner_pid, request
from client.private_socket import listen, private_folder, worker_files
from client.wire import Call, call_frame, decode_body, parse_reply, PREFIX
from client.worker import Worker

pytestmark = pytest.mark.usefixtures("serverapp_identity")


def counting(msg: Message, context: Context) -> Message:
    """A handler that keeps state in the context, as Flower's SecAgg+ mod does."""
    seen = int(context.state["counter"]["n"]) if "counter" in context.state else 0
    context.state["counter"] = ConfigRecord({"n": seen + 1})
    return Message(RecordDict({"metrics": MetricRecord({"n": seen + 1})}), reply_to=msg)


def failing(msg: Message, context: Context) -> Message:
    raise ValueError("no data on this device\nsecond line")


def identity(msg: Message, context: Context) -> Message:
    """A handler that creates a Message of its own: it needs the task identity set."""
    probe = Message(RecordDict(), dst_node_id=1, message_type="query")
    metrics = MetricRecord({"task": TaskIdentity.task_id, "run": TaskIdentity.run_id, "node": TaskIdentity.node_id, "src-task": probe.metadata.src_task_id})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def stranger(msg: Message, context: Context) -> Message:
    other = Message(RecordDict(), dst_node_id=1, message_type="train")
    other.metadata.__dict__["_message_id"] = "0" * 64
    return Message(RecordDict(), reply_to=other)


HANDLERS = {"train": counting, "evaluate": failing, "query": identity, "stranger": stranger}


@pytest.fixture()
def served():
    """Worker files whose socket a Worker serves from a thread (with the stand-in handlers)."""
    with tempfile.TemporaryDirectory(prefix="fsw-", dir="/tmp") as folder:
        files = worker_files(private_folder(Path(folder) / "worker"))
        server = listen(files.socket)
        worker = Worker(HANDLERS)

        threading.Thread(target=worker.serve, args=(server,), daemon=True).start()  # ends when the server closes
        yield files
        server.close()


def message(config: dict | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord(config)} if config is not None else {})
    msg = Message(content, dst_node_id=5, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def device(files) -> Context:
    return Context(run_id=1, node_id=5, node_config={SOCKET_KEY: str(files.socket), OWNER_KEY: os.getpid()}, state=RecordDict(), run_config={})


def test_the_handlers_state_comes_back_into_the_same_context(served, capfd):
    ctx = device(served)
    for expected in (1, 2, 3):
        reply = forward("train", message(), ctx)
        assert reply.content["metrics"]["n"] == expected and ctx.state["counter"]["n"] == expected
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("[fedsite] forwarder train: started ") and "s before handoff, worker " in line


def test_a_failing_handler_is_one_line_and_the_worker_goes_on(served):
    with pytest.raises(RuntimeError) as err:
        forward("evaluate", message(), device(served))
    assert str(err.value) == "fedsite worker: evaluate raised ValueError: no data on this device second line"
    with pytest.raises(RuntimeError, match="no handler 'nothing'"):
        forward("nothing", message(), device(served))
    assert forward("train", message(), device(served)).content["metrics"]["n"] == 1


def test_the_worker_runs_the_handler_under_the_forwarders_task_identity(served):
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 41, 42, 43
    frame = call_frame(Call("query", message(), device(served), (7, 8, 9)))
    reply = parse_reply(decode_body(Worker(HANDLERS).answer(decode_body(frame[PREFIX.size :]))[PREFIX.size :]))
    assert dict(reply.message.content["metrics"]) == {"task": 7, "run": 8, "node": 9, "src-task": 7}


def test_a_reply_to_another_message_is_refused(served):
    with pytest.raises(RuntimeError, match="answers another message"):
        forward("stranger", message(), device(served))


def test_ping_and_stats(served):
    assert request(served, "ping")["pid"] == os.getpid()
    forward("train", message(), device(served))
    assert request(served, "stats")["messages"] == 1


def test_the_timeout_is_the_rounds_and_bounded():
    assert message_timeout(message({"round-timeout": 30.0})) == 30.0
    assert message_timeout(message({"round-timeout": 7})) == 7.0
    for bad in ({"round-timeout": -1.0}, {"round-timeout": float("nan")}, {"round-timeout": "soon"}, {"other": 1}, None):
        assert message_timeout(message(bad)) == DEFAULT_TIMEOUT
    assert message_timeout(message({"round-timeout": 1e12})) == forwarder.MAX_TIMEOUT


def test_the_owner_is_fedsite_client_else_the_superexec():
    assert owner_pid({OWNER_KEY: 1234}) == 1234
    assert owner_pid({}) == owner_pid({OWNER_KEY: "x"}) == os.getppid()


def test_a_worker_that_cannot_start_is_one_clear_error_in_bounded_time(tmp_path):
    with tempfile.TemporaryDirectory(prefix="fsw-", dir="/tmp") as folder:
        files = worker_files(Path(folder) / "worker")
        dead_owner = 2**22 + 12345  # above Linux's default pid_max: no such process
        files.folder.mkdir(mode=0o700)
        with open(files.log, "wb") as log:
            log.truncate(forwarder.MAX_LOG_BYTES + 1)  # a long-lived worker's log: rotated at the next start
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"fedsite worker failed to start \(exit 3\): see .*worker.log"):
            forwarder.connect_or_start(files, dead_owner, start_timeout=60)
        assert time.monotonic() - started < 60
        assert "owner pid" in files.log.read_text() and files.log.stat().st_size < 1 << 16
        assert files.log.with_name("worker.log.1").stat().st_size == forwarder.MAX_LOG_BYTES + 1


def test_the_import_time_of_the_forwarder_is_measured():
    seconds = forwarder.import_seconds("client.wire")
    assert 0 < seconds < 30
