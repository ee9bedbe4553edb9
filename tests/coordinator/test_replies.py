"""The checked decoding step: metric schema, declines, errors, query answers, byte budgets."""

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator.replies import (
    EVAL_METRICS,
    TRAIN_METRICS,
    EvalReply,
    Rejected,
    TrainReply,
    one_line,
    payload_budget,
    read_dp,
    read_evaluate_reply,
    read_metrics,
    read_query_answer,
    read_train_reply,
    read_vector,
)
from protos.tensors import to_array_record
from protos.updates import encode_update

GLOBAL = {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 2), np.float32)}
DP = {"dp-noise-multiplier": 1.0, "dp-sample-rate": 0.1, "dp-steps": 2.0, "dp-total-steps": 4.0, "dp-delta": 1e-5, "dp-epsilon": 0.5}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def answer(content, node: int = 5, kind: str = MessageType.TRAIN) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=kind)
    return Message(content, reply_to=request) if isinstance(content, RecordDict) else Message(content, reply_to=request)


def train_reply(metrics: dict, arrays: dict | None = None) -> Message:
    arrays = {k: v + 1 for k, v in GLOBAL.items()} if arrays is None else arrays
    sent = {k: GLOBAL[k] if k in GLOBAL and GLOBAL[k].shape == v.shape else np.zeros_like(v) for k, v in arrays.items()}
    return answer(RecordDict({"arrays": to_array_record(encode_update(arrays, sent)), "metrics": MetricRecord(metrics)}))


@pytest.mark.parametrize(
    ("metrics", "words"),
    [
        ({}, "missing metric num-examples"),
        ({"num-examples": [10]}, "metric num-examples: a list, expected a number"),
        ({"num-examples": 10, "train-loss": [1.0]}, "metric train-loss: a list"),
        ({"num-examples": float("inf")}, "metric num-examples: inf, expected a finite number"),
        ({"num-examples": 10.5}, "expected a whole number"),
        ({"num-examples": -5}, "metric num-examples: -5 is outside [0, 9.0072e+15]"),
        ({"num-examples": 2**70}, "is beyond"),
        ({"num-examples": 10, "upload-bytes": float("nan")}, "metric upload-bytes: NaN"),
        ({"num-examples": 10, "upload-bytes": float("inf")}, "metric upload-bytes: inf"),
        ({"num-examples": 10, "train-loss": -1.0}, "metric train-loss: -1.0 is outside [0, 1e+12]"),
        ({"num-examples": 10, "train-seconds": 1e300}, "metric train-seconds"),
        ({"num-examples": 10, "dp-epsilon": 1.0}, "incomplete DP metrics: missing dp-noise-multiplier"),
        ({"num-examples": 10, **DP, "dp-sample-rate": 2.0}, "metric dp-sample-rate: 2.0 is outside [0, 1]"),
        ({"num-examples": 10, **DP, "dp-delta": 0.0}, "metric dp-delta: 0.0 is outside (0, 1)"),
        ({"num-examples": 10, **DP, "dp-total-steps": 1.0}, "dp-total-steps 1 < dp-steps 2"),
        ({"num-examples": 0}, "num-examples must be positive, got 0"),
    ],
)
def test_bad_train_metrics_are_rejected_naming_the_key(metrics, words):
    outcome = read_train_reply(train_reply(metrics), GLOBAL)
    assert isinstance(outcome, Rejected) and words in outcome.reason, outcome
    assert "\n" not in outcome.reason


@pytest.mark.parametrize(
    ("value", "words"),
    [(3.0, "a float, expected a list"), ([1.0], "1 values, expected 2"), ([1.0, -1.0], "-1.0 is outside"), ([1.0, float("inf")], "expected a finite number"),
     ([1.0, float("nan")], "NaN"), ([1] * 70000, "70000 values")],
)
def test_kill_revive_gradient_norms_are_one_checked_number_per_module(value, words):
    outcome = read_train_reply(train_reply({"num-examples": 10, "kr-grad-norms": value}), GLOBAL, grad_len=2)
    assert isinstance(outcome, Rejected) and outcome.reason.startswith("metric kr-grad-norms:") and words in outcome.reason, outcome
    for raw, what in [("1,2", "a str, expected a list"), ([1.0, "x"], "a str, expected a number"), ([0.5, True], "a bool")]:  # what a MetricRecord would not hold
        assert what in read_vector({"kr-grad-norms": raw}, "kr-grad-norms", 2)[1]


def test_kill_revive_gradient_norms_are_read_only_when_asked_for():
    metrics = {"num-examples": 10, "kr-grad-norms": [0.5, 2.0]}
    assert read_train_reply(train_reply(metrics), GLOBAL, grad_len=2).grad_norms == (0.5, 2.0)
    plain = read_train_reply(train_reply(metrics), GLOBAL)
    assert plain.grad_norms == () and plain.dropped == 0 and "kr-grad-norms" not in plain.metrics
    assert read_train_reply(train_reply({"num-examples": 10}), GLOBAL, grad_len=2).grad_norms == ()  # not sent: no score, no rejection


def test_unknown_metric_keys_are_dropped_and_ids_never_read():
    outcome = read_train_reply(train_reply({"num-examples": 10, "client-id": 3, "node_id": 99.0, "status": 1, "train-loss": 1}), GLOBAL)
    assert isinstance(outcome, TrainReply)
    assert outcome.metrics == {"num-examples": 10, "train-loss": 1.0} and outcome.dropped == 2  # client-id: dropped, not counted
    assert outcome.examples == 10 and outcome.norm == pytest.approx(math.sqrt(12))
    assert read_metrics({"x": "lots", 3: 1}, TRAIN_METRICS) == ({}, 2, None)
    assert read_metrics([1, 2], TRAIN_METRICS)[2] == "metrics are a list, expected a metric record"


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 1e13, "many", True])
def test_counted_gflops_are_checked_like_the_seconds(value):
    # train-gflops sets a simulated client's compute time and energy: a bad claim is refused, never costed
    metrics, _, reason = read_metrics({"num-examples": 1, "train-gflops": value}, TRAIN_METRICS)
    assert reason is not None and reason.startswith("metric train-gflops:") and "train-gflops" not in metrics
    assert read_metrics({"num-examples": 1, "train-gflops": 12.5}, TRAIN_METRICS)[0]["train-gflops"] == 12.5


def test_dp_group_is_all_or_nothing():
    metrics, _, _ = read_metrics({"num-examples": 1, **DP}, TRAIN_METRICS)
    report, reason = read_dp(metrics)
    assert reason is None and (report.steps, report.total_steps, report.epsilon) == (2, 4, 0.5)
    assert read_dp({"num-examples": 1}) == (None, None)
    negative, _, reason = read_metrics({**DP, "dp-epsilon": -3.0}, TRAIN_METRICS)  # allowed through: the ledger marks it
    assert reason is None and read_dp(negative)[0].epsilon == -3.0


def test_declines_and_errors_become_one_line_reasons():
    plain = answer(RecordDict({"declined": ConfigRecord({"reason": "budget\nspent\u2028now"}), "metrics": MetricRecord({"num-examples": 0})}))
    assert read_train_reply(plain, GLOBAL).reason == "declined: budget spent now"
    assert read_train_reply(answer(RecordDict({"declined": ConfigRecord({})})), GLOBAL).reason == "declined (no reason given)"
    assert read_train_reply(answer(RecordDict({"declined": ConfigRecord({"reason": b"x"})})), GLOBAL).reason == "declined (no reason given)"
    assert read_train_reply(answer(RecordDict({"declined": MetricRecord({"reason": 1})})), GLOBAL).reason == "declined (no reason given)"
    long = read_train_reply(answer(RecordDict({"declined": ConfigRecord({"reason": "x" * 10_000})})), GLOBAL).reason
    assert len(long) < 220 and long.endswith("...")
    traceback = "Traceback (most recent call last):\n  File ...\n\x1b[36mray::Actor\nConnectionError: dropped out\n"
    assert read_train_reply(answer(Error(code=0, reason=traceback)), GLOBAL).reason == "client error: ConnectionError: dropped out"
    assert read_train_reply(answer(Error(code=0)), GLOBAL).reason == "client error (no reason given)"
    assert one_line("a\x00b\r\nc\x85d\u2029e", 20) == "a b c d e" and one_line("abcdefgh", 6) == "abc..."


def test_missing_or_misplaced_records_are_rejected():
    assert "no 'metrics' metric record" in read_train_reply(answer(RecordDict({"metrics": ConfigRecord({"num-examples": "lots"})})), GLOBAL).reason
    assert "no 'arrays' array record" in read_train_reply(answer(RecordDict({"metrics": MetricRecord({"num-examples": 1})})), GLOBAL).reason
    wrong = read_train_reply(train_reply({"num-examples": 1}, {"a": np.ones((3, 3), np.float32), "b": np.ones((3, 2), np.float32)}), GLOBAL)
    assert "undecodable update: tensor 'a': shape [3, 3], expected [2, 3]" in wrong.reason


def test_payload_budget_follows_the_global_shapes_and_max_update_mb():
    big = {"a": np.zeros(1000, np.float32)}
    assert payload_budget(big) == 9 * 1000 + 256 + 1024
    assert payload_budget(big, 2000) == 2000 + 256 + 1024
    reply = train_reply({"num-examples": 1}, {"a": np.ones(1000, np.float32)})
    outcome = read_train_reply(reply, big, max_update_bytes=1000)
    assert isinstance(outcome, Rejected) and outcome.reason.startswith("unreadable arrays:") and "budget" in outcome.reason
    assert isinstance(read_train_reply(reply, big, max_update_bytes=4000), TrainReply)


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"num-examples": 4, "eval-loss": 1.0, "eval-accuracy": 0.5}, EvalReply(4, 1.0, 0.5, {"num-examples": 4, "eval-loss": 1.0, "eval-accuracy": 0.5})),
        ({"num-examples": 0, "eval-seconds": 1.0}, None),  # nothing to evaluate on this client
        ({"num-examples": 4, "eval-accuracy": 0.5}, "missing metric eval-loss"),
        ({"num-examples": 4, "eval-loss": float("nan"), "eval-accuracy": 0.5}, "metric eval-loss: NaN"),
        ({"num-examples": 4, "eval-loss": 1.0, "eval-accuracy": 2.0}, "metric eval-accuracy: 2.0 is outside [0, 1]"),
        ({"eval-loss": 1.0, "eval-accuracy": 0.5}, "missing metric num-examples"),
    ],
)
def test_evaluate_replies(metrics, expected):
    outcome = read_evaluate_reply(answer(RecordDict({"metrics": MetricRecord(metrics)}), kind=MessageType.EVALUATE))
    if isinstance(expected, str):
        assert isinstance(outcome, Rejected) and expected in outcome.reason
    else:
        assert outcome == expected
    assert set(EVAL_METRICS) == {"num-examples", "eval-loss", "eval-accuracy", "eval-seconds"}


@pytest.mark.parametrize(
    ("info", "pid", "words"),
    [
        ({"partition-id": 3, "profile": "phone"}, 3, None),
        ({"partition-id": "3"}, -1, "partition-id '3' is not an int"),
        ({"partition-id": True}, -1, "partition-id True"),
        ({"partition-id": 2**40}, -1, "not an int in [-1, 2^31)"),
        ({"partition-id": -1, "profile": "a\nb"}, -1, "not a one-line name"),
        ({"partition-id": -1, "holds-backbone": "false"}, -1, "holds-backbone 'false' is not a bool"),
        ({"partition-id": -1, "holds-backbone": True, "memory-gb": -1.0}, -1, "memory-gb -1.0 is not a number"),
        ({"partition-id": -1, "holds-backbone": True, "memory-gb": "lots"}, -1, "memory-gb 'lots'"),
        ({"partition-id": -1, "holds-backbone": True, "memory-gb": float("nan")}, -1, "memory-gb nan"),
    ],
)
def test_query_answers_are_checked(info, pid, words):
    parsed, reason = read_query_answer(answer(RecordDict({"client": ConfigRecord(info)}), kind=MessageType.QUERY))
    assert parsed.partition_id == pid
    assert (reason is None) if words is None else (words in reason), reason
    device, reason = read_query_answer(answer(RecordDict({"client": ConfigRecord({"partition-id": -1, "holds-backbone": False, "memory-gb": 2, "quantized": True})}), kind=MessageType.QUERY))
    assert reason is None and (device.memory_gb, device.holds_backbone, device.quantized) == (2.0, False, True)
    assert read_query_answer(answer(RecordDict({}), kind=MessageType.QUERY))[1] == "query answer has no 'client' config record"


@pytest.mark.parametrize("seconds,words", [(float("nan"), "NaN"), (-1.0, "outside"), (float("inf"), "finite"), (1e13, "outside")])
def test_measured_compute_seconds_are_checked(seconds, words):
    """Deployed clients' train-seconds feed the energy account: hostile values are refused."""
    outcome = read_train_reply(train_reply({"num-examples": 10, "train-seconds": seconds}), GLOBAL)
    assert isinstance(outcome, Rejected) and "train-seconds" in outcome.reason and words in outcome.reason


def test_adaptive_replies_decode_and_hostile_precision_tags_are_rejected():
    from protos.adaptive import encode_adaptive

    delta = {k: np.full(v.shape, 0.5, np.float32) for k, v in GLOBAL.items()}
    good = answer(RecordDict({"arrays": to_array_record(encode_adaptive(delta)), "metrics": MetricRecord({"num-examples": 10})}))
    outcome = read_train_reply(good, GLOBAL)
    assert not isinstance(outcome, Rejected)
    payload = encode_adaptive(delta)
    tag = next(k for k in payload if k.endswith("::prec"))
    payload[tag] = np.array([7], np.uint8)
    bad = answer(RecordDict({"arrays": to_array_record(payload), "metrics": MetricRecord({"num-examples": 10})}))
    outcome = read_train_reply(bad, GLOBAL)
    assert isinstance(outcome, Rejected) and outcome.reason.startswith("undecodable update") and "precision tag" in outcome.reason
