"""The forwarder <-> worker wire format: exact round trips of real messages, and every kind of
malformed frame refused with a WireError (never a crash, never a huge allocation)."""

import json
import socket
import struct
import threading
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import wire
from client.wire import Call, ConnectionClosed, Reply, WireError

pytestmark = pytest.mark.usefixtures("serverapp_identity")

NODE_ID = 14675348686697280990  # a real SuperNode's id: uint64, above int64's range


def train_message() -> Message:
    arrays = ArrayRecord({"layer.lora_A": Array(np.arange(12, dtype=np.float32).reshape(3, 4)), "layer.lora_B": Array(np.ones((4, 2), dtype=np.float64))})
    content = RecordDict({
        "arrays": arrays,
        "config": ConfigRecord({"server-round": 3, "model": "tiny", "lr": 1e-3, "factors": ["A", "B"], "blob": b"\x00\x01"}),
        "metrics": MetricRecord({"seen": 7, "loss": 0.25}),
    })
    message = Message(content=content, dst_node_id=NODE_ID, message_type="train", group_id="round-3")
    message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperLink sets it
    return message


def reply_to(message: Message) -> Message:
    arrays = ArrayRecord({"layer.lora_A": Array(np.full((3, 4), 0.5, dtype=np.float32))})
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 12, "train-loss": 1.5})}), reply_to=message)


def context() -> Context:
    state = RecordDict({"secagg": ConfigRecord({"stage": "setup", "keys": [b"k1", b"k2"]}), "m": MetricRecord({"x": 1.0})})
    return Context(run_id=9, node_id=NODE_ID, node_config={"worker-socket": "/tmp/w.sock", "memory-gb": 2.5}, state=state, run_config={"model": "tiny"})


def body(frame: bytes) -> bytes:
    return frame[wire.PREFIX.size :]


def same_message(a: Message, b: Message) -> None:
    assert a.metadata == b.metadata
    assert a.content == b.content
    for name, record in a.content.array_records.items():
        for key, array in record.items():
            assert np.array_equal(array.numpy(), b.content.array_records[name][key].numpy())
            assert array.numpy().dtype == b.content.array_records[name][key].numpy().dtype


def test_a_call_round_trips_a_train_message_and_a_context_with_state_exactly():
    message, ctx = train_message(), context()
    task = (2**63 - 5, 2**63 - 7, NODE_ID)
    decoded = wire.parse_request(wire.decode_body(body(wire.call_frame(Call("train", message, ctx, task)))))
    assert decoded.handler == "train" and decoded.task == task
    same_message(decoded.message, message)
    assert decoded.message.metadata.message_id == message.object_id and decoded.message.object_id == message.object_id
    assert decoded.context == ctx and decoded.context.state["secagg"]["keys"] == [b"k1", b"k2"]


def test_a_reply_round_trips_with_its_reply_to_and_handler_seconds():
    message = train_message()
    reply, ctx = reply_to(message), context()
    decoded = wire.parse_reply(wire.decode_body(body(wire.reply_frame(Reply(reply, ctx, 1.25)))))
    assert isinstance(decoded, Reply) and decoded.seconds == 1.25
    same_message(decoded.message, reply)
    assert decoded.message.metadata.reply_to_message_id == message.metadata.message_id != ""
    assert decoded.context == ctx


def test_error_and_info_replies_and_plain_requests():
    assert wire.parse_reply(wire.decode_body(body(wire.error_frame("train raised\nValueError: x")))) == "train raised ValueError: x"
    assert wire.parse_reply(wire.decode_body(body(wire.info_frame({"pid": 3})))) == {"pid": 3}
    assert wire.parse_request(wire.decode_body(body(wire.request_frame("stats")))) == "stats"


def tampered(mutate) -> bytes:
    """A call frame body whose header `mutate` changes (blobs kept)."""
    frame = wire.decode_body(body(wire.call_frame(Call("train", train_message(), context(), (1, 1, 1)))))
    header, blobs = frame.header, frame.blobs
    mutate(header, blobs)
    return body(wire.encode_frame(header, blobs))


def _swap_blob(header, blobs):
    blobs[0] = blobs[0][:-1] + bytes([blobs[0][-1] ^ 1])


def _drop_object(header, blobs):
    del blobs[0], header["message"]["objects"][0]
    header["context"] -= 1


def _extra_object(header, blobs):
    extra = ConfigRecord({"unused": 1})
    blobs.insert(0, extra.deflate())
    header["message"]["objects"].insert(0, extra.object_id)
    header["context"] += 1


def _root_not_a_message(header, blobs):
    header["message"]["root"] = header["message"]["objects"][0]


@pytest.mark.parametrize("mutate, error", [
    (_swap_blob, "does not match its id"),
    (_drop_object, "does not inflate"),
    (_extra_object, "not part of the message"),
    (_root_not_a_message, "not part of the message|not a Message"),
    (lambda h, b: h.update(handler="../etc"), "handler"),
    (lambda h, b: h.update(task=[1, 2]), "task identity"),
    (lambda h, b: h.update(task=[1, True, 3]), "task identity"),
    (lambda h, b: h.update(task=[1, 2, 2**64]), "task identity"),
    (lambda h, b: h.update(type="exec"), "unknown request type"),
    (lambda h, b: h["message"].update(id="not-a-hash"), "message id"),
    (lambda h, b: h["message"].update(extra=1), "exactly id, root and objects"),
    (lambda h, b: h.update(context=0), "context must be the last blob"),
    (lambda h, b: b.__setitem__(-1, b"\xff\xff\xff"), "context does not decode"),
])
def test_a_tampered_call_is_refused(mutate, error):
    with pytest.raises(WireError, match=error):
        wire.parse_request(wire.decode_body(tampered(mutate)))


def raw_body(header: bytes, tail: bytes = b"") -> bytes:
    return struct.pack(">I", len(header)) + header + tail


@pytest.mark.parametrize("data, error", [
    (b"", "too short"),
    (struct.pack(">I", 1 << 30) + b"{}", "out of bounds"),
    (raw_body(b"{not json"), "not JSON"),
    (raw_body(b"[" * 100000 + b"]" * 100000), "not JSON|not a JSON object"),
    (raw_body(b"[1]"), "not a JSON object"),
    (raw_body(b'{"type":"ping"}'), "no valid blob list"),
    (raw_body(b'{"type":"ping","blobs":[-1]}'), "no valid blob list"),
    (raw_body(b'{"type":"ping","blobs":[5]}', b"abc"), "add up"),
])
def test_a_malformed_body_is_refused(data, error):
    with pytest.raises(WireError, match=error):
        wire.decode_body(data)


def test_a_frame_with_a_foreign_magic_or_an_absurd_length_is_refused_before_its_body_arrives():
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack(">4sQ", b"HTTP", 10))
        with pytest.raises(WireError, match="not a Fedsite worker frame"):
            wire.recv_frame(right, time.monotonic() + 5)
        left.sendall(struct.pack(">4sQ", wire.MAGIC, 1 << 40))  # claims a TiB, sends nothing more
        started = time.monotonic()
        with pytest.raises(WireError, match="exceeds the limit"):
            wire.recv_frame(right, time.monotonic() + 5)
        assert time.monotonic() - started < 1


def test_a_peer_that_closes_mid_frame_or_stalls_is_bounded():
    left, right = socket.socketpair()
    with right:
        frame = wire.request_frame("ping")
        left.sendall(frame[:-3])
        with pytest.raises(TimeoutError):
            wire.recv_frame(right, time.monotonic() + 0.3)
        left.close()
        with pytest.raises(ConnectionClosed):
            wire.recv_frame(right, time.monotonic() + 5)


def test_a_large_frame_arrives_whole_over_a_socket():
    message = train_message()
    message.content["arrays"] = ArrayRecord({"big": Array(np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32))})
    frame = wire.call_frame(Call("train", message, context(), (1, 1, 1)))
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(target=wire.send_frame, args=(left, frame, time.monotonic() + 30))
        sender.start()
        decoded = wire.parse_request(wire.recv_frame(right, time.monotonic() + 30))
        sender.join()
    same_message(decoded.message, message)


def test_frames_above_the_bound_are_not_built():
    with pytest.raises(WireError, match="header"):
        wire.encode_frame({"type": "info", "info": {"x": "y" * (wire.MAX_HEADER_BYTES + 1)}})
    assert json.loads(body(wire.encode_frame({"type": "ping"}))[4:]) == {"type": "ping", "blobs": []}
