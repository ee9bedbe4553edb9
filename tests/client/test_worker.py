"""The forwarder and a real worker process over a real socket, on the tiny model: the same reply
as the in-process handler, a model cache that outlives messages, and restarts after a worker
is killed between or during messages or stops answering (each ~15 s of imports on 2 cores)."""

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client import client_app, handlers
from client.forwarder import OWNER_KEY, SOCKET_KEY, connect_or_start, request, stop_worker_at
from client.private_socket import connect, worker_files
from client.wire import encode_frame, parse_reply, recv_frame, send_frame
from protos.tensors import from_array_record
from tests.client.test_client_app import CONFIG, train_message

pytestmark = pytest.mark.usefixtures("serverapp_identity")


@pytest.fixture(scope="module")
def files():
    """One worker folder for the module (a short path: Unix socket paths stay under ~100 bytes);
    the worker inherits this environment (PYTHONPATH, FEDSITE_CACHE) and one thread, as the tests."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="fsw-", dir="/tmp") as folder:
        files = worker_files(Path(folder) / "worker")
        yield files
        stop_worker_at(files)
    if before is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = before


def device(files, state_dir: Path, state: RecordDict | None = None) -> Context:
    """A deployed client's context: the node config `fedsite client` writes, with the worker's socket."""
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(state_dir), SOCKET_KEY: str(files.socket), OWNER_KEY: os.getpid()}
    return Context(run_id=1, node_id=5, node_config=node, state=state or RecordDict(), run_config={})


def local(state_dir: Path) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2, "state-dir": str(state_dir)}, state=RecordDict(), run_config={})


def worker_pid(files) -> int:
    return request(files, "stats")["pid"]


def slow_message(round_timeout: float) -> Message:
    """A train message that runs for minutes unless its worker is stopped."""
    return train_message(CONFIG.replace(local_steps=100000, round_timeout=round_timeout))


def gone(pid: int, timeout: float = 30) -> bool:
    """Whether `pid` has exited within `timeout`: gone, or a zombie none of whose threads still run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE and len(os.listdir(f"/proc/{pid}/task")) <= 1:
                return True
        except (psutil.NoSuchProcess, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


def test_a_forwarded_train_message_gets_the_in_process_handlers_reply(files, tmp_path, capfd):
    message = train_message(CONFIG)
    expected = handlers.train_handler(message, local(tmp_path / "in-process"))
    state = RecordDict({"mod": ConfigRecord({"stage": "setup"})})
    ctx = device(files, tmp_path / "worker", state)
    reply = client_app.train_handler(message, ctx)
    got, want = from_array_record(reply.content["arrays"]), from_array_record(expected.content["arrays"])
    assert sorted(got) == sorted(want) and all(np.array_equal(got[key], want[key]) for key in want)
    for key in ("num-examples", "train-loss", "train-loss-final", "steps", "upload-bytes", "client-id"):
        assert reply.content["metrics"][key] == expected.content["metrics"][key]
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert (reply.metadata.src_node_id, reply.metadata.dst_node_id, reply.metadata.message_type) == (expected.metadata.src_node_id, expected.metadata.dst_node_id, "train")
    assert ctx.state["mod"]["stage"] == "setup"  # the context went there and back
    line = [text for text in capfd.readouterr().err.splitlines() if text.startswith("[fedsite] forwarder train:")][-1]
    assert "s before handoff, worker " in line


def test_the_worker_keeps_its_model_across_messages(files, tmp_path):
    client_app.train_handler(train_message(CONFIG), device(files, tmp_path))
    before = request(files, "stats")
    client_app.train_handler(train_message(CONFIG), device(files, tmp_path))
    client_app.evaluate_handler(train_message(CONFIG), device(files, tmp_path))
    after = request(files, "stats")
    assert after["pid"] == before["pid"] and after["messages"] == before["messages"] + 2
    assert after["cache"]["misses"] == before["cache"]["misses"] == 1  # built once, for the first message
    assert after["cache"]["hits"] == before["cache"]["hits"] + 2
    assert request(files, "ping")["pid"] == before["pid"]


def test_evaluate_and_query_through_the_worker_match_in_process(files, tmp_path):
    message = train_message(CONFIG)
    forwarded = client_app.evaluate_handler(message, device(files, tmp_path))
    expected = handlers.evaluate_handler(message, local(tmp_path))
    for key in ("num-examples", "eval-loss", "eval-accuracy"):
        assert forwarded.content["metrics"][key] == expected.content["metrics"][key]
    query = Message(content=RecordDict(), dst_node_id=5, message_type="query")
    assert client_app.query_handler(query, device(files, tmp_path)).content["client"]["partition-id"] == 0


def test_a_worker_killed_between_messages_is_restarted_once_by_concurrent_forwarders(files, tmp_path):
    client_app.query_handler(Message(content=RecordDict(), dst_node_id=5, message_type="query"), device(files, tmp_path))  # a worker runs
    old = worker_pid(files)
    os.kill(old, signal.SIGKILL)
    assert gone(old)
    replies, errors = [], []

    def forward() -> None:
        try:
            replies.append(client_app.train_handler(train_message(CONFIG), device(files, tmp_path)))
        except Exception as err:  # noqa: BLE001 (collected, then asserted empty)
            errors.append(err)

    forwarders = [threading.Thread(target=forward) for _ in range(3)]
    for thread in forwarders:
        thread.start()
    for thread in forwarders:
        thread.join(300)
    assert not errors and len(replies) == 3
    stats = request(files, "stats")
    assert stats["pid"] != old and stats["messages"] == 3  # one new worker served all three


def test_a_worker_killed_during_a_message_is_one_clear_error_and_the_next_message_restarts_it(files, tmp_path):
    client_app.query_handler(Message(content=RecordDict(), dst_node_id=5, message_type="query"), device(files, tmp_path))
    pid = worker_pid(files)
    threading.Timer(2.0, os.kill, (pid, signal.SIGKILL)).start()
    started = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        client_app.train_handler(slow_message(round_timeout=120), device(files, tmp_path))
    assert time.monotonic() - started < 30
    text = str(err.value)
    assert "\n" not in text and text.startswith("fedsite worker died while handling train") and f"see {files.log}" in text
    reply = client_app.train_handler(train_message(CONFIG), device(files, tmp_path))
    assert reply.content["metrics"]["num-examples"] > 0 and worker_pid(files) != pid


def test_a_worker_that_stops_answering_is_stopped_after_the_round_timeout(files, tmp_path):
    client_app.query_handler(Message(content=RecordDict(), dst_node_id=5, message_type="query"), device(files, tmp_path))
    pid = worker_pid(files)
    os.kill(pid, signal.SIGSTOP)  # alive, accepting at the kernel, answering nothing
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"fedsite worker \(pid \d+\) did not answer train within 3s") as err:
        client_app.train_handler(slow_message(round_timeout=3), device(files, tmp_path))
    assert 3 <= time.monotonic() - started < 20 and "\n" not in str(err.value)
    assert gone(pid)  # stopped, so that the next message starts a fresh one


def test_a_malformed_frame_gets_an_error_reply_and_the_worker_keeps_serving(files, tmp_path):
    sock, pid, _ = connect_or_start(files, os.getpid())
    sock.close()
    for frame in (b"FSW1" + (1 << 62).to_bytes(8, "big"), encode_frame({"type": "call", "handler": "train", "task": [1, 1, 1], "message": {}, "context": 0}, [b"x"]), b"GET / HTTP/1.1\r\n\r\n"):
        sock, _ = connect(files.socket, 10)
        with sock:
            send_frame(sock, frame, time.monotonic() + 10)
            answer = parse_reply(recv_frame(sock, time.monotonic() + 30))
        assert isinstance(answer, str) and answer.startswith("malformed request")
    assert worker_pid(files) == pid
    reply = client_app.query_handler(Message(content=RecordDict(), dst_node_id=5, message_type="query"), device(files, tmp_path))
    assert reply.content["client"]["partition-id"] == 0
