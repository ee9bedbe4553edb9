"""The forwarder <-> worker wire format: length-prefixed frames carrying Flower's own encodings.

A frame is `b"FSW1"`, the body's length (8 bytes, big-endian) and the body; a body is a JSON
header's length (4 bytes), the header, then the binary blobs the header lists by size. Every
frame is bounded (MAX_FRAME_BYTES, MAX_HEADER_BYTES) and every field is checked: bytes from the
other end are treated as hostile, and anything malformed is a WireError, never pickle, never a
crash of the reader.

- A Message travels as Flower's inflatable objects: every nested object (message, record dict,
  records, arrays, array chunks) deflated, each blob checked against its sha256 object id and
  Flower's content validation before `inflate_object_from_contents` rebuilds it; the message id
  (not part of the deflated message) travels in the header, as the Runtime API's object tree
  carries it.
- A Context travels as `context_to_proto(...).SerializeToString()`.
- Flower's TaskIdentity (task, run, node ids) travels with a call: a handler that creates a
  Message needs it set in its process.

Requests: `call` (handler, task identity, message, context), `ping`, `stats`. Replies: `reply`
(message, context, handler seconds), `info` (a small JSON object), `error` (one line of text).
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_id, no_object_id_recompute
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, validate_object_content

MAGIC = b"FSW1"  # the protocol's version is part of it: a worker and a forwarder of other versions refuse each other
PREFIX = struct.Struct(">4sQ")
HEADER_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 30  # 1 GiB: far above any adapter's arrays, far below what would hurt a device
MAX_HEADER_BYTES = 1 << 20
MAX_OBJECTS = 1 << 16
MAX_ERROR_CHARS = 2000
CHUNK = 1 << 20
REQUESTS = ("call", "ping", "stats")
REPLIES = ("reply", "info", "error")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID_RANGE = (-(1 << 63), (1 << 64) - 1)  # Flower's ids: node ids are uint64, others int64


class WireError(ValueError):
    """A frame or payload that does not follow this protocol."""


class ConnectionClosed(EOFError):
    """The other end closed the socket before a whole frame arrived."""


@dataclass
class Frame:
    """One decoded frame: its JSON header and the blobs it lists."""

    header: dict
    blobs: list[bytes] = field(default_factory=list)


@dataclass
class Call:
    """A handler call: what the worker needs to run `handler(message, context)`."""

    handler: str
    message: Message
    context: Context
    task: tuple[int | None, int | None, int | None]  # TaskIdentity: task_id, run_id, node_id


@dataclass
class Reply:
    """The worker's answer to a call: the reply message and the context after the handler."""

    message: Message
    context: Context
    seconds: float


# ---------------------------------------------------------------- frames on a socket


def encode_frame(header: dict, blobs: Sequence[bytes] = ()) -> bytes:
    blobs = list(blobs)
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"frame header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    body_length = HEADER_LENGTH.size + len(head) + sum(len(b) for b in blobs)
    if body_length > MAX_FRAME_BYTES:
        raise WireError(f"frame of {body_length} bytes exceeds {MAX_FRAME_BYTES}")
    return b"".join([PREFIX.pack(MAGIC, body_length), HEADER_LENGTH.pack(len(head)), head, *blobs])


def decode_body(body: bytes) -> Frame:
    """A frame body -> Frame; WireError for anything that does not add up."""
    if len(body) < HEADER_LENGTH.size:
        raise WireError("frame body too short for its header length")
    (head_length,) = HEADER_LENGTH.unpack_from(body)
    if head_length > MAX_HEADER_BYTES or HEADER_LENGTH.size + head_length > len(body):
        raise WireError(f"frame header length {head_length} out of bounds")
    try:
        header = json.loads(body[HEADER_LENGTH.size : HEADER_LENGTH.size + head_length])
    except (ValueError, RecursionError) as err:
        raise WireError(f"frame header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise WireError("frame header is not a JSON object")
    sizes = header.pop("blobs", None)
    if not isinstance(sizes, list) or len(sizes) > MAX_OBJECTS + 1 or not all(_is_int(s) and s >= 0 for s in sizes):
        raise WireError("frame header has no valid blob list")
    offset = HEADER_LENGTH.size + head_length
    if offset + sum(sizes) != len(body):
        raise WireError(f"frame blobs add up to {sum(sizes)} bytes, the body holds {len(body) - offset}")
    blobs = []
    for size in sizes:
        blobs.append(body[offset : offset + size])
        offset += size
    return Frame(header, blobs)


def send_frame(sock: socket.socket, frame: bytes, deadline: float) -> None:
    sock.settimeout(_remaining(deadline))
    sock.sendall(frame)


def recv_frame(sock: socket.socket, deadline: float, max_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """Read one frame by `deadline` (time.monotonic()): TimeoutError, ConnectionClosed or WireError else.

    The buffer grows with what arrives, so a peer that claims a huge length costs nothing
    until it actually sends it, and a claim above `max_bytes` is refused at once.
    """
    magic, length = PREFIX.unpack(_recv_exact(sock, PREFIX.size, deadline))
    if magic != MAGIC:
        raise WireError(f"not a Fedsite worker frame (magic {magic!r}, expected {MAGIC!r})")
    if length > max_bytes:
        raise WireError(f"frame of {length} bytes exceeds the limit of {max_bytes}")
    return decode_body(_recv_exact(sock, length, deadline))


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(min(size - len(buffer), CHUNK))
        if not chunk:
            raise ConnectionClosed(f"peer closed the socket after {len(buffer)} of {size} bytes")
        buffer += chunk
    return bytes(buffer)


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline passed")
    return remaining


# ---------------------------------------------------------------- requests and replies


def call_frame(call: Call) -> bytes:
    message, blobs = pack_message(call.message)
    header = {"type": "call", "handler": call.handler, "task": list(call.task), "message": message, "context": len(blobs)}
    return encode_frame(header, [*blobs, pack_context(call.context)])


def request_frame(kind: str) -> bytes:
    """A request without payload: `ping` or `stats`."""
    if kind not in ("ping", "stats"):
        raise WireError(f"unknown request {kind!r}")
    return encode_frame({"type": kind})


def reply_frame(reply: Reply) -> bytes:
    message, blobs = pack_message(reply.message)
    header = {"type": "reply", "message": message, "context": len(blobs), "seconds": float(reply.seconds)}
    return encode_frame(header, [*blobs, pack_context(reply.context)])


def info_frame(info: dict) -> bytes:
    return encode_frame({"type": "info", "info": info})


def error_frame(text: str) -> bytes:
    return encode_frame({"type": "error", "error": one_line(text)})


def parse_request(frame: Frame) -> Call | str:
    """A call, or the name of a payload-free request ('ping', 'stats')."""
    kind = frame.header.get("type")
    if kind not in REQUESTS:
        raise WireError(f"unknown request type {str(kind)[:40]!r}")
    if kind != "call":
        if frame.blobs:
            raise WireError(f"{kind} request carries data")
        return kind
    handler = frame.header.get("handler")
    if not isinstance(handler, str) or not re.fullmatch(r"[a-z_]{1,32}", handler):
        raise WireError("call without a valid handler name")
    task = frame.header.get("task")
    if not isinstance(task, list) or len(task) != 3 or not all(t is None or (_is_int(t) and _ID_RANGE[0] <= t <= _ID_RANGE[1]) for t in task):
        raise WireError("call without a valid task identity")
    message, context = _message_and_context(frame)
    return Call(handler, message, context, (task[0], task[1], task[2]))


def parse_reply(frame: Frame) -> Reply | dict | str:
    """A Reply, an info dict, or an error line (str)."""
    kind = frame.header.get("type")
    if kind == "error":
        text = frame.header.get("error")
        if not isinstance(text, str) or frame.blobs:
            raise WireError("malformed error reply")
        return one_line(text)
    if kind == "info":
        info = frame.header.get("info")
        if not isinstance(info, dict) or frame.blobs:
            raise WireError("malformed info reply")
        return info
    if kind != "reply":
        raise WireError(f"unknown reply type {str(kind)[:40]!r}")
    seconds = frame.header.get("seconds")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < float("inf"):
        raise WireError("reply without valid handler seconds")
    message, context = _message_and_context(frame)
    return Reply(message, context, float(seconds))


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


# ---------------------------------------------------------------- Message and Context


def pack_message(message: Message) -> tuple[dict, list[bytes]]:
    """Flower's deflated objects of `message` (children before parents) and the header naming them."""
    with no_object_id_recompute():
        objects = get_all_nested_objects(message)
        root = message.object_id
        blobs = [obj.deflate() for obj in objects.values()]
    return {"id": message.metadata.message_id, "root": root, "objects": list(objects)}, blobs


def unpack_message(spec: object, blobs: list[bytes]) -> Message:
    """Rebuild a Message from its deflated objects, each checked against its id and Flower's format."""
    if not isinstance(spec, dict) or set(spec) != {"id", "root", "objects"}:
        raise WireError("message header must hold exactly id, root and objects")
    message_id, root, ids = spec["id"], spec["root"], spec["objects"]
    if not isinstance(message_id, str) or not (message_id == "" or _HEX64.fullmatch(message_id)):
        raise WireError("message id is neither empty nor a sha256 hex digest")
    if not isinstance(ids, list) or len(ids) != len(blobs) or len(ids) > MAX_OBJECTS:
        raise WireError(f"message lists {len(ids) if isinstance(ids, list) else '?'} objects for {len(blobs)} blobs")
    contents: dict[str, bytes] = {}
    for object_id, content in zip(ids, blobs):
        if not isinstance(object_id, str) or get_object_id(content) != object_id:
            raise WireError("a message object does not match its id")
        try:
            validate_object_content(content)
        except Exception as err:  # Flower's UnexpectedObjectContentError, or a bad header's decode error
            raise WireError(f"malformed message object: {one_line(str(err))[:200]}") from None
        contents[object_id] = content
    if root not in contents:
        raise WireError("message root is not among its objects")
    try:
        message = inflate_object_from_contents(root, contents, keep_object_contents=False)
    except Exception as err:  # a missing child, a child of the wrong type, a bad body
        raise WireError(f"message does not inflate: {type(err).__name__}: {one_line(str(err))[:200]}") from None
    if contents:
        raise WireError(f"{len(contents)} message objects are not part of the message")
    if not isinstance(message, Message):
        raise WireError(f"message root is a {type(message).__name__}, not a Message")
    message.metadata.__dict__["_message_id"] = message_id  # as Flower's pull_task_input sets it
    return message


def pack_context(context: Context) -> bytes:
    return context_to_proto(context).SerializeToString()


def unpack_context(blob: bytes) -> Context:
    try:
        return context_from_proto(ProtoContext.FromString(blob))
    except Exception as err:  # protobuf's DecodeError, or a value Flower's serde refuses
        raise WireError(f"context does not decode: {type(err).__name__}") from None


def _message_and_context(frame: Frame) -> tuple[Message, Context]:
    index = frame.header.get("context")
    if not _is_int(index) or index != len(frame.blobs) - 1:
        raise WireError("the context must be the last blob")
    return unpack_message(frame.header.get("message"), frame.blobs[:index]), unpack_context(frame.blobs[index])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
