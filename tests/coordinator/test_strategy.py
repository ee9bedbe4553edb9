"""FedsiteStrategy.aggregate_train on real Flower messages: bad replies never reach the mean."""

import json

import numpy as np
import pytest
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator.results import RunRecorder
from coordinator.strategy import FedsiteStrategy
from finetune.config import FedsiteConfig
from protos.tensors import from_array_record, to_array_record
from protos.updates import encode_update

GLOBAL = {"l.lora_A.weight": np.zeros((2, 3), np.float32), "l.lora_B.weight": np.zeros((3, 2), np.float32)}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def reply(node: int, arrays: dict, examples: int = 10, codec: str = "fp32") -> Message:
    """A client's reply carrying `arrays` as trained weights, encoded as clients do."""
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    base = {k: GLOBAL[k] if k in GLOBAL and GLOBAL[k].shape == v.shape else np.zeros_like(v) for k, v in arrays.items()}
    payload = encode_update(arrays, base, codec)
    content = RecordDict({"arrays": to_array_record(payload), "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, "upload-bytes": 48})})
    return Message(content=content, reply_to=request)


def make_strategy(tmp_path) -> FedsiteStrategy:
    strategy = FedsiteStrategy(RunRecorder(tmp_path, FedsiteConfig()), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2)
    strategy._global = GLOBAL
    return strategy


def full(value: float) -> dict:
    return {k: np.full(v.shape, value, np.float32) for k, v in GLOBAL.items()}


def test_weighted_mean_of_valid_updates(tmp_path):
    strategy = make_strategy(tmp_path)
    arrays, metrics = strategy.aggregate_train(1, [reply(2, full(1.0), 10), reply(3, full(4.0), 30)])
    result = from_array_record(arrays)
    assert np.allclose(result["l.lora_A.weight"], 3.25)
    assert metrics["num-examples"] == 40


def test_bad_updates_are_rejected_and_recorded(tmp_path):
    strategy = make_strategy(tmp_path)
    nan = full(1.0)
    nan["l.lora_A.weight"][0, 0] = np.nan
    wrong_shape = {**full(1.0), "l.lora_B.weight": np.zeros((2, 2), np.float32)}
    request = Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
    crashed = Message(Error(code=1, reason="out of memory"), reply_to=request)
    replies = [reply(2, full(2.0)), reply(3, nan), reply(4, wrong_shape), reply(5, {**full(1.0), "x": np.zeros(1, np.float32)}), crashed, reply(6, full(1.0), 0)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(from_array_record(arrays)["l.lora_B.weight"], 2.0)  # only node 2 got in
    strategy.recorder.finish_round(1, {"eval_loss": 1.0, "eval_accuracy": 0.0})
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["contributors"] == [2]
    reasons = {r["client"]: r["reason"] for r in row["rejected"]}
    assert "NaN" in reasons[3] and "shape" in reasons[4] and "unknown key x" in reasons[5]
    assert "out of memory" in reasons[7] and "num-examples" in reasons[6]
    statuses = [json.loads(line)["status"] for line in (tmp_path / "clients.jsonl").read_text().splitlines()]
    assert statuses.count("accepted") == 1 and statuses.count("rejected") == 5


def test_compressed_replies_are_decoded(tmp_path):
    strategy = make_strategy(tmp_path)
    arrays, _ = strategy.aggregate_train(1, [reply(2, full(1.0), codec="int8"), reply(3, full(3.0), codec="4bit")])
    assert np.allclose(from_array_record(arrays)["l.lora_A.weight"], 2.0, atol=1e-2)


def test_tampered_payload_is_rejected(tmp_path):
    strategy = make_strategy(tmp_path)
    bad = reply(3, full(1.0), codec="int8")
    payload = from_array_record(bad.content["arrays"])
    payload["l.lora_A.weight::q"] = payload["l.lora_A.weight::q"][:2]
    bad.content["arrays"] = to_array_record(payload)
    arrays, _ = strategy.aggregate_train(1, [reply(2, full(1.0)), bad])
    assert np.allclose(from_array_record(arrays)["l.lora_A.weight"], 1.0)
    assert "undecodable" in json.loads((tmp_path / "clients.jsonl").read_text().splitlines()[1])["reason"]


def test_round_with_only_bad_updates_keeps_the_global(tmp_path):
    strategy = make_strategy(tmp_path)
    arrays, metrics = strategy.aggregate_train(1, [reply(3, {"x": np.zeros(1, np.float32)})])
    assert arrays is None and metrics is None


def test_norm_bound_rejects_far_updates(tmp_path):
    strategy = FedsiteStrategy(RunRecorder(tmp_path, FedsiteConfig()), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2, max_update_norm=5.0)
    strategy._global = GLOBAL
    arrays, _ = strategy.aggregate_train(1, [reply(2, full(1.0)), reply(3, full(100.0))])
    assert np.allclose(from_array_record(arrays)["l.lora_A.weight"], 1.0)
    assert "exceeds bound" in json.loads((tmp_path / "clients.jsonl").read_text().splitlines()[1])["reason"]
