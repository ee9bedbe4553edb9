"""Thousands of malformed replies against a real FedsiteStrategy, each beside one good reply.

Every case is one round: the good client (node 2) sends a valid fp32 update, the bad one (node 3)
a reply broken one seeded-random way (metrics, codec headers and parts of every codec, raw array
bytes, message structure, scaled updates). Asserted for every case:

- no exception leaves `aggregate_train` / `aggregate_evaluate` (a crash), and no reply is
  rejected as an "internal error" (the last line of defence must never be needed);
- the aggregate is finite; when the bad reply was rejected it equals the good update exactly;
- it is never captured: with both accepted, the aggregate's delta from the global is at most
  `multiple` x the good delta's norm (the adaptive bound: of two updates the smaller norm is the
  reference, and a mean never leaves the hull); with `max-weight-share` 0.5, the aggregate also
  stays within half of the way from the good update to the bad one;
- every rejection is a clients.jsonl line with a one-line reason;
- memory is bounded: the tracemalloc peak of the round stays below 2x the global arrays plus
  a few MiB (numpy allocations are traced), whatever size a header or shape claims.

Evaluation replies and query answers get the same treatment. The summary line printed at the end
(`pytest -s`) gives the numbers: cases, rejected, crashes, worst peak memory.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import tracemalloc
import zipfile

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator.directory import ClientDirectory
from coordinator.ledger import recompute_epsilon
from coordinator.planner import DeviceProfile, Planner
from coordinator.results import RunRecorder
from coordinator.strategy import FedsiteStrategy
from finetune.config import FedsiteConfig
from protos.codecs import CODECS, HEADER_KEY, SEP
from protos.tensors import from_array_record, to_array_record
from protos.updates import decode_update, encode_update

SEED = 15
TRAIN_CASES = 3000
EVAL_CASES = 600
QUERY_CASES = 400
MULTIPLE = 5.0
RNG0 = np.random.default_rng(SEED)
GLOBAL = {"m.lora_A.weight": RNG0.standard_normal((2, 8)).astype(np.float32), "m.lora_B.weight": RNG0.standard_normal((8, 2)).astype(np.float32)}
GOOD = {k: v + (0.05 * RNG0.standard_normal(v.shape)).astype(np.float32) for k, v in GLOBAL.items()}
GLOBAL_BYTES = sum(v.nbytes for v in GLOBAL.values())
MEMORY_BUDGET = 2 * GLOBAL_BYTES + 4 * 2**20
GOOD_METRICS = {"num-examples": 10, "train-loss": 1.0, "train-loss-final": 0.9, "steps": 4, "train-seconds": 0.5, "upload-bytes": 200, "client-id": 0}
DP_KEYS = ("dp-noise-multiplier", "dp-sample-rate", "dp-steps", "dp-total-steps", "dp-delta", "dp-epsilon")
WEIRD_NUMBERS = [0, -1, -(10**6), 10**12, 2**63, 2**70, 1.5, -0.5, math.inf, -math.inf, math.nan, 1e300, 3.4e38, 5e-324, [1.0], [1, 2]]


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


@pytest.fixture()
def quiet():
    """Thousands of rejections are thousands of warnings; keep errors (an internal error would log one)."""
    loggers = [logging.getLogger(name) for name in ("fedsite.coordinator", "flwr")]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    yield
    for logger, level in zip(loggers, before):
        logger.setLevel(level)


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def request(node: int, kind: str = MessageType.TRAIN) -> Message:
    return Message(content=RecordDict(), dst_node_id=node, message_type=kind)


def good_reply(node: int = 2) -> Message:
    payload = encode_update(GOOD, GLOBAL, "fp32")
    return Message(RecordDict({"arrays": to_array_record(payload), "metrics": MetricRecord(GOOD_METRICS)}), reply_to=request(node))


# ------------------------------------------------------------------ raw bytes
def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_header(descr: object, shape: tuple, body: bytes = b"", version: int = 1) -> bytes:
    buffer = io.BytesIO()
    write = np.lib.format.write_array_header_1_0 if version == 1 else np.lib.format.write_array_header_2_0
    write(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + body


def raw_bytes(rng: np.random.Generator, good: bytes) -> bytes:
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("x.npy", good)
    options = [
        lambda: b"",
        lambda: good[: int(rng.integers(0, len(good)))],
        lambda: good + bytes(int(rng.integers(1, 64))),
        lambda: zipped.getvalue(),
        lambda: npy_header("<f4", (2**20, 2**20)),
        lambda: npy_header("<f8", (2**40,), version=2),
        lambda: npy_header("|O", (2,), pickle.dumps({"x": 1})),
        lambda: pickle.dumps(np.ones(3)),
        lambda: npy_header([("a", "<f4"), ("b", "<i4")], (2,), bytes(16)),
        lambda: npy_header("<U4", (2,), bytes(32)),
        lambda: npy_header("<c8", (2,), bytes(16)),
        lambda: npy_header("<M8[s]", (2,), bytes(16)),
        lambda: npy_header("<f4", (1,) * 40, bytes(4)),
        lambda: npy(np.ones(int(rng.integers(1, 50)), np.float64)),
        lambda: npy(np.ones((3, 3, 3), np.float32)),
        lambda: b"\x93NUMPY\x01\x00\xff\xff" + b"[" * 60000,
        lambda: b"\x93NUMPY\x03\x00" + bytes(20),
        lambda: rng.bytes(int(rng.integers(1, 300))),
    ]
    return options[int(rng.integers(len(options)))]()


def with_raw_array(record: ArrayRecord, rng: np.random.Generator) -> ArrayRecord:
    names = list(record.keys())
    name = names[int(rng.integers(len(names)))]
    original = record[name]
    out = ArrayRecord(array_dict={k: record[k] for k in names})
    stype = "torch" if rng.random() < 0.05 else original.stype
    out[name] = Array(dtype=original.dtype, shape=tuple(original.shape), stype=stype, data=raw_bytes(rng, original.data))
    return out


# ------------------------------------------------------------------ codec payloads
def codec_payload(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A valid payload of a random codec (top-k or not), then broken in one or two places."""
    codec = CODECS[int(rng.integers(len(CODECS)))]
    topk = float(pick(rng, [0.25, 0.5, 1.0])) if rng.random() < 0.4 else None
    trained = {k: v + (0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in GLOBAL.items()}
    payload = encode_update(trained, GLOBAL, codec, topk)
    for _ in range(int(rng.integers(1, 3))):
        break_payload(payload, rng)
    return payload


def break_payload(payload: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    keys = [k for k in payload if k != HEADER_KEY] or ["w::q"]
    key = keys[int(rng.integers(len(keys)))]
    tensor = key.rpartition(SEP)[0]
    value = payload.get(key, np.ones(3, np.float32))
    edits = [
        lambda: payload.update({HEADER_KEY: np.frombuffer(rng.bytes(int(rng.integers(0, 40))), np.uint8).copy()}),
        lambda: payload.update({HEADER_KEY: np.frombuffer(str(pick(rng, ["int4", "fp32+topk", "4bit+", "fp64", "int8+topk+topk"])).encode(), np.uint8).copy()}),
        lambda: payload.update({HEADER_KEY: np.array([102, 112, 51, 50], np.int32)}),
        lambda: payload.update({HEADER_KEY: np.frombuffer(b"fp32", np.uint8).reshape(2, 2).copy()}),
        lambda: payload.pop(HEADER_KEY, None),
        lambda: payload.pop(key, None),
        lambda: payload.update({key: value[: max(0, value.size - int(rng.integers(1, 4)))] if value.ndim == 1 else value}),
        lambda: payload.update({key: np.concatenate([value.reshape(-1), value.reshape(-1)[:1]]) if value.size else value}),
        lambda: payload.update({key: value.astype(pick(rng, [np.float64, np.int64, np.float16, np.uint8, np.int32]))}),
        lambda: payload.update({key: value.reshape(1, -1)}),
        lambda: payload.update({f"{tensor}{SEP}shape": np.array(pick(rng, [[2**20, 2**20], [2**14, 2**14], [-2, 8], [8, 2], [16], [2, 8, 1]]), np.int32)}),
        lambda: payload.update({f"{tensor}{SEP}shape": np.ones(int(rng.integers(33, 70)), np.int32)}),
        lambda: payload.update({f"{tensor}{SEP}idx": np.array(rng.integers(-5, 40, size=int(rng.integers(0, 20))), np.int32)}),
        lambda: payload.update({f"{tensor}{SEP}idx": np.arange(16, dtype=np.int32)[::-1].copy()}),
        lambda: payload.update({f"{tensor}{SEP}scale": np.full(max(1, value.size), pick(rng, [-1.0, np.nan, np.inf, 1e38]), np.float32)}),
        lambda: payload.update({f"{tensor}{SEP}extra": np.ones(3, np.float32)}),
        lambda: payload.update({"stray": np.ones(2, np.float32)}),
        lambda: payload.update({f"unknown{SEP}shape": np.array([2**14, 2**14], np.int32), f"unknown{SEP}q": np.ones(4, np.float32), f"unknown{SEP}idx": np.arange(4, dtype=np.int32)}),
        lambda: payload.update({f"unknown{SEP}shape": np.array([3], np.int32), f"unknown{SEP}q": np.ones(3, np.float32)}),
        lambda: payload.update({f"{SEP}q": np.ones(3, np.float32)}),
        lambda: payload.update({key: np.full(value.shape, pick(rng, [np.nan, np.inf, 1e38, -3e38]), value.dtype) if value.dtype.kind == "f" else value}),
        lambda: payload.update({key: rng.integers(0, 256, value.size).astype(np.uint8) if value.dtype == np.uint8 else value}),
    ]
    edits[int(rng.integers(len(edits)))]()


def scaled_payload(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], float]:
    factor = float(pick(rng, [0.0, 1e-30, 0.5, 2.0, 4.9, 5.1, 10.0, 1000.0, -1000.0, 1e30]))
    trained = {k: (GLOBAL[k].astype(np.float64) + factor * (GOOD[k] - GLOBAL[k])).astype(np.float32) for k in GLOBAL}
    return encode_update(trained, GLOBAL, str(pick(rng, ["fp32", "fp16", "int8"])) if abs(factor) < 1e4 else "fp32"), factor


# ------------------------------------------------------------------ metrics and structure
def bad_metrics(rng: np.random.Generator) -> dict:
    metrics = dict(GOOD_METRICS)
    kind = int(rng.integers(8))
    key = str(pick(rng, list(GOOD_METRICS) + list(DP_KEYS)))
    weird = WEIRD_NUMBERS[int(rng.integers(len(WEIRD_NUMBERS)))]
    if kind == 0:
        metrics.pop(str(pick(rng, list(GOOD_METRICS))), None)
    elif kind == 1:
        metrics[key] = weird
    elif kind == 2:  # a lone dp metric, or the whole group with random values
        metrics["dp-epsilon"] = float(rng.normal())
        if rng.random() < 0.7:
            values = {"dp-noise-multiplier": pick(rng, [0.0, 0.5, 1.0, 1e6]), "dp-sample-rate": pick(rng, [0.0, 0.01, 0.5, 1.0, 2.0]),
                      "dp-steps": pick(rng, [0, 2, 5, -1]), "dp-total-steps": pick(rng, [0, 5, 10]), "dp-delta": pick(rng, [1e-5, 0.0, 1.0]),
                      "dp-epsilon": pick(rng, [-3.0, 0.0, 0.5, 1e9, math.inf])}
            metrics.update({k: float(v) for k, v in values.items()})
    elif kind == 3:  # identity spoofing: ids and record field names as metrics
        metrics.update({"client-id": 2, "node_id": 2, "status": 1, "round": 99, "client": 2, "reason": 0, "weight": 1e9})
    elif kind == 4:  # junk keys
        for _ in range(int(rng.integers(1, 20))):
            metrics[f"k{int(rng.integers(1000))}"] = WEIRD_NUMBERS[int(rng.integers(len(WEIRD_NUMBERS)))]
    elif kind == 5:
        metrics["num-examples"] = weird
    elif kind == 6:
        metrics["num-examples"] = int(pick(rng, [10**12, 2**53, 99_999, 100_001, 1]))
    else:
        metrics[key] = [float(x) for x in rng.normal(size=int(rng.integers(0, 5)))]
    return metrics


def structure_reply(rng: np.random.Generator) -> Message:
    payload = to_array_record(encode_update(GOOD, GLOBAL))
    reason = pick(rng, ["", "budget spent", "x" * 5000, "line\nbreak\u2028sep\x85nel\x00nul"])
    options = [
        lambda: RecordDict({"metrics": MetricRecord(GOOD_METRICS)}),
        lambda: RecordDict({"arrays": payload}),
        lambda: RecordDict({}),
        lambda: RecordDict({"arrays": payload, "metrics": ConfigRecord({"num-examples": "lots", "train-loss": "1.0"})}),
        lambda: RecordDict({"arrays": ConfigRecord({"x": 1}), "metrics": MetricRecord(GOOD_METRICS)}),
        lambda: RecordDict({"declined": ConfigRecord({})}),
        lambda: RecordDict({"declined": ConfigRecord({"reason": str(reason)}), "metrics": MetricRecord({"num-examples": 0})}),
        lambda: RecordDict({"declined": ConfigRecord({"reason": [1, 2]})}),
        lambda: RecordDict({"declined": MetricRecord({"reason": 1.0}), "arrays": payload, "metrics": MetricRecord(GOOD_METRICS)}),
        lambda: RecordDict({"arrays": payload, "metrics": MetricRecord(GOOD_METRICS), "extra": ConfigRecord({"node_id": 2}), "more": to_array_record({"x": np.ones(3, np.float32)})}),
        lambda: Error(code=int(rng.integers(0, 5)), reason=str(reason)),
        lambda: Error(code=0),
        lambda: Error(code=0, reason="Traceback (most recent call last):\n  File x\nMemoryError: " + "y" * 500),
    ]
    content = options[int(rng.integers(len(options)))]()
    return Message(content, reply_to=request(3))


def bad_reply(rng: np.random.Generator) -> tuple[str, Message]:
    family = str(rng.choice(np.array(["metrics", "codec", "raw", "structure", "scaled"]), p=[0.25, 0.3, 0.2, 0.1, 0.15]))
    if family == "structure":
        return family, structure_reply(rng)
    metrics = bad_metrics(rng) if family == "metrics" else dict(GOOD_METRICS, **{"client-id": 2})
    if family == "codec":
        record = to_array_record(codec_payload(rng))
    elif family == "scaled":
        record = to_array_record(scaled_payload(rng)[0])
    else:
        record = to_array_record(encode_update({k: v + 0.01 for k, v in GLOBAL.items()}, GLOBAL, str(pick(rng, CODECS))))
        if family == "raw":
            record = with_raw_array(record, rng)
    return family, Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=request(3))


def delta_norm(arrays: dict) -> float:
    return math.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - GLOBAL[k]) ** 2)) for k in GLOBAL))


def new_lines(path, offset: int) -> tuple[list[dict], int]:
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    return [json.loads(line) for line in data.decode().splitlines()], offset + len(data)


# ------------------------------------------------------------------ the test
def test_malformed_replies_never_crash_capture_or_blow_up_the_round(tmp_path, quiet):
    rng = np.random.default_rng(SEED)
    recorder = RunRecorder(tmp_path, FedsiteConfig(dp="local"))
    clients_path, offset = tmp_path / "clients.jsonl", 0
    good_norm = delta_norm(GOOD)
    stats = {"cases": 0, "rejected": 0, "bad_accepted": 0, "good_rejected": 0, "crashes": 0, "internal_errors": 0, "worst_peak": 0, "worst_family": ""}
    problems: list[str] = []
    recompute_epsilon([(1.0, 0.1, 1)], 1e-5)  # imports torch and Opacus once, before memory is measured
    try:
        for case in range(TRAIN_CASES):
            family, bad = bad_reply(rng)
            share = 0.5 if case % 3 == 0 else 0.0
            strategy = FedsiteStrategy(recorder, fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2, max_weight_share=share)
            strategy._global = GLOBAL
            if case % 4 >= 2:  # a later round: an honest round came before (the norm bound has a previous reference)
                strategy.aggregate_train(case + 1, [good_reply(2), good_reply(4)])
                _, offset = new_lines(clients_path, offset)
            replies = [good_reply(), bad] if case % 2 else [bad, good_reply()]
            tracemalloc.start()  # traces only what the round allocates (the replies are built already)
            try:
                arrays, _ = strategy.aggregate_train(case + 1, replies)
            except Exception as err:  # a crash: what the issue found in ~13% of cases
                stats["crashes"] += 1
                problems.append(f"case {case} ({family}): {type(err).__name__}: {err}")
                continue
            finally:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            if peak > stats["worst_peak"]:
                stats["worst_peak"], stats["worst_family"] = peak, family
            stats["cases"] += 1
            lines, offset = new_lines(clients_path, offset)
            by_node = {line["node_id"]: line for line in lines}
            if set(by_node) != {2, 3} or any(line["status"] == "rejected" and not (isinstance(line.get("reason"), str) and line["reason"] and "\n" not in line["reason"]) for line in lines):
                problems.append(f"case {case} ({family}): records {lines}")
                continue
            good_ok, bad_ok = by_node[2]["status"] == "accepted", by_node[3]["status"] == "accepted"
            stats["rejected"] += not bad_ok
            stats["bad_accepted"] += bad_ok
            stats["good_rejected"] += not good_ok
            stats["internal_errors"] += any(str(line.get("reason", "")).startswith("internal error") for line in lines)
            if by_node[3].get("client_id") != 3 or by_node[2].get("client_id") != 2:
                problems.append(f"case {case} ({family}): a record named by a metric: {lines}")
            if peak > MEMORY_BUDGET:
                problems.append(f"case {case} ({family}): peak {peak} bytes > budget {MEMORY_BUDGET}")
            if arrays is None:
                if good_ok or bad_ok:
                    problems.append(f"case {case} ({family}): an accepted update but no aggregate")
                continue
            result = from_array_record(arrays)
            if not all(np.all(np.isfinite(v)) for v in result.values()):
                problems.append(f"case {case} ({family}): non-finite aggregate")
            elif good_ok and not bad_ok and not all(np.array_equal(result[k], GOOD[k]) for k in GLOBAL):
                problems.append(f"case {case} ({family}): the aggregate is not the good update")
            elif bad_ok and delta_norm(result) > MULTIPLE * good_norm * (1 + 1e-6) + 1e-6:
                problems.append(f"case {case} ({family}): captured: aggregate delta {delta_norm(result):.3g} > {MULTIPLE} x good {good_norm:.3g}")
            elif good_ok and bad_ok and share:
                theirs = decode_update(from_array_record(bad.content["arrays"]), GLOBAL)
                gap = math.sqrt(sum(float(np.sum((theirs[k].astype(np.float64) - GOOD[k]) ** 2)) for k in GLOBAL))
                moved = math.sqrt(sum(float(np.sum((result[k].astype(np.float64) - GOOD[k]) ** 2)) for k in GLOBAL))
                if moved > share * gap * (1 + 1e-5) + 1e-6:
                    problems.append(f"case {case} ({family}): weight share: moved {moved:.3g} > {share} x {gap:.3g}")
    finally:
        if tracemalloc.is_tracing():
            tracemalloc.stop()
    print(f"\nreply fuzz (seed {SEED}): {stats['cases']} train cases, {stats['rejected']} malformed replies rejected, "
          f"{stats['bad_accepted']} accepted (bounded), {stats['good_rejected']} good replies rejected beside them, "
          f"{stats['crashes']} crashes, {stats['internal_errors']} internal errors, worst peak {stats['worst_peak'] / 1024:.1f} KiB "
          f"({stats['worst_family']}; budget {MEMORY_BUDGET / 2**20:.1f} MiB)")
    assert stats["crashes"] == 0 and stats["internal_errors"] == 0, problems[:5]
    assert not problems, problems[:5]
    assert stats["cases"] == TRAIN_CASES and stats["rejected"] > TRAIN_CASES * 0.6  # the cases are mostly malformed
    assert stats["bad_accepted"] > 50  # benign-looking ones (junk keys, spoofed ids, capped counts, small scales) get in, bounded


def eval_metrics(rng: np.random.Generator) -> MetricRecord | ConfigRecord | Error:
    metrics = {"num-examples": 8, "eval-loss": 1.0, "eval-accuracy": 0.5, "eval-seconds": 0.1, "client-id": 1}
    kind = int(rng.integers(5))
    if kind == 0:
        metrics.pop(str(pick(rng, list(metrics))))
    elif kind == 1:
        metrics[str(pick(rng, list(metrics)))] = WEIRD_NUMBERS[int(rng.integers(len(WEIRD_NUMBERS)))]
    elif kind == 2:
        metrics.update({"num-examples": int(pick(rng, [0, 10**12, 2**53])), "eval-accuracy": float(pick(rng, [0.0, 1.0, 1.5]))})
    elif kind == 3:
        return ConfigRecord({"num-examples": "lots"}) if rng.random() < 0.5 else Error(code=1, reason="evaluation failed\nbadly")
    else:
        metrics.update({f"x{i}": float(v) for i, v in enumerate(rng.normal(size=5))})
    return MetricRecord(metrics)


def test_malformed_evaluate_replies_never_crash_or_leave_the_range(tmp_path, quiet):
    rng = np.random.default_rng(SEED + 1)
    strategy = FedsiteStrategy(RunRecorder(tmp_path, FedsiteConfig()), fraction_train=1.0, fraction_evaluate=1.0, min_train_clients=2)
    good = {"num-examples": 8, "eval-loss": 2.0, "eval-accuracy": 0.25}
    rejected = 0
    for case in range(EVAL_CASES):
        content = eval_metrics(rng)
        bad = Message(content if isinstance(content, Error) else RecordDict({"metrics": content}), reply_to=request(3, MessageType.EVALUATE))
        good_msg = Message(RecordDict({"metrics": MetricRecord(good)}), reply_to=request(2, MessageType.EVALUATE))
        before = (tmp_path / "clients.jsonl").read_text().count("\n")
        result = strategy.aggregate_evaluate(case, [good_msg, bad])  # raises on a crash: the test fails
        lines = (tmp_path / "clients.jsonl").read_text().splitlines()[before:]
        rejected += len(lines)
        assert all(json.loads(line)["reason"] for line in lines)
        assert result is not None and 0.0 <= result["eval-accuracy"] <= 1.0 and math.isfinite(result["eval-loss"])
        if not lines:  # the bad one got in: capped at client-eval-examples (16) against the good one's 8
            assert abs(result["eval-accuracy"] - 0.25) <= 2 / 3 * 0.75 + 1e-9
    print(f"\nevaluate fuzz (seed {SEED + 1}): {EVAL_CASES} cases, {rejected} rejected, 0 crashes")
    assert rejected > EVAL_CASES * 0.3


class FuzzGrid:
    """Answers who-are-you queries with random, mostly malformed, config records."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def send_and_receive(self, messages, timeout=None):
        rng = self.rng
        values = [-5, -1, 0, 1, 3, 2**31, 2**40, True, "3", b"3", 1.5, [1, 2], "lots", math.nan, -1.0, 1e308, "a\nb", "x" * 100]
        out = []
        for m in messages:
            if rng.random() < 0.1:
                out.append(Message(Error(code=1, reason="no query handler"), reply_to=m))
                continue
            info = {}
            for key in ("partition-id", "profile", "holds-backbone", "memory-gb", "quantized"):
                if rng.random() < 0.7:
                    info[key] = values[int(rng.integers(len(values)))]
            record = RecordDict({"client": ConfigRecord(info)}) if rng.random() < 0.9 else RecordDict({"other": ConfigRecord(info)})
            out.append(Message(record, reply_to=m))
        return out


class Population:
    deadline, upload_seconds = 0.0, 1.0

    def profile_of(self, pid: int) -> DeviceProfile:
        if not 0 <= pid < 4:
            raise ValueError(f"partition id {pid} outside 0..3")
        return DeviceProfile(f"p{pid}")

    def event(self, server_round: int, pid: int) -> str:
        self.profile_of(pid)
        return "train"


def test_malformed_query_answers_never_crash_the_planner_or_the_names(quiet):
    rng = np.random.default_rng(SEED + 2)
    run = FedsiteConfig(clients=4, lora_rank=2).to_flat()
    directory, planner = ClientDirectory(4), Planner(Population(), run)
    nodes = list(range(100, 100 + QUERY_CASES))
    for start in range(0, QUERY_CASES, 20):
        batch = nodes[start : start + 20]
        directory.query(batch, FuzzGrid(rng))
        messages = [Message(content=RecordDict({"config": ConfigRecord(run)}), message_type=MessageType.TRAIN, dst_node_id=n) for n in batch]
        planned = planner.plan_round(1, messages, to_array_record(GLOBAL), FuzzGrid(rng))
        assert len(planned) == len(batch)  # every node gets a package (the default profile if its answer was refused)
    names = [directory.name(n) for n in nodes]
    assert len(set(names)) == len(names)  # no two nodes share a name
    assert all(0 <= name < 4 or name == node for name, node in zip(names, nodes))
    print(f"\nquery fuzz (seed {SEED + 2}): {QUERY_CASES} answers, {sum(name != node for name, node in zip(names, nodes))} partition ids taken, 0 crashes")
