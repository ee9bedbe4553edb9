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


def rows_of(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "clients.jsonl").read_text().splitlines()]


def test_default_norm_bound_is_relative_to_the_round(tmp_path):
    strategy = make_strategy(tmp_path)  # only the contract's arguments: the adaptive default applies
    arrays, _ = strategy.aggregate_train(1, [reply(2, full(1.0)), reply(3, full(1000.0))])
    assert np.allclose(from_array_record(arrays)["l.lora_A.weight"], 1.0)
    assert "exceeds 5 x the round's reference norm" in rows_of(tmp_path)[1]["reason"]
    # three clients: the median decides; the scaled one is out, the two honest ones in
    arrays, _ = strategy.aggregate_train(2, [reply(2, full(1.0)), reply(4, full(2.0)), reply(3, full(-1000.0))])
    assert np.allclose(from_array_record(arrays)["l.lora_A.weight"], 1.5)
    # alone in a round: compared with the previous round's median accepted norm
    arrays, _ = strategy.aggregate_train(3, [reply(3, full(1000.0))])
    assert arrays is None and "reference norm" in rows_of(tmp_path)[-1]["reason"]


def test_max_update_norm_zero_turns_the_norm_bound_off(tmp_path):
    strategy = FedsiteStrategy(RunRecorder(tmp_path, FedsiteConfig()), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2, max_update_norm=0.0)
    strategy._global = GLOBAL
    arrays, _ = strategy.aggregate_train(1, [reply(2, full(1.0)), reply(3, full(1000.0))])
    assert np.allclose(from_array_record(arrays)["l.lora_A.weight"], 500.5)


def test_example_counts_and_weight_shares_are_capped(tmp_path):
    strategy = make_strategy(tmp_path)
    arrays, metrics = strategy.aggregate_train(1, [reply(2, full(1.0), 10), reply(3, full(4.0), 10**12)])
    expected = (10 * 1.0 + 100_000 * 4.0) / 100_010  # 10^12 examples count as max-client-examples
    assert np.allclose(from_array_record(arrays)["l.lora_A.weight"], expected) and metrics["num-examples"] == 100_010
    assert rows_of(tmp_path)[1]["examples_capped"] is True and rows_of(tmp_path)[1]["num_examples"] == 10**12
    shared = FedsiteStrategy(RunRecorder(tmp_path / "share", FedsiteConfig()), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2, max_weight_share=0.5)
    shared._global = GLOBAL
    arrays, _ = shared.aggregate_train(1, [reply(2, full(1.0), 10), reply(3, full(4.0), 10**12)])
    assert np.allclose(from_array_record(arrays)["l.lora_A.weight"], 2.5)  # neither holds more than half


def test_records_name_the_authenticated_node_never_a_metric(tmp_path):
    strategy = make_strategy(tmp_path)
    spoof = reply(3, full(2.0))
    spoof.content["metrics"] = MetricRecord({"num-examples": 10, "client-id": 2, "node_id": 2, "status": 1, "round": 9})
    strategy.aggregate_train(1, [reply(2, full(1.0)), spoof])
    first, second = rows_of(tmp_path)
    assert (second["node_id"], second["client_id"], second["status"], second["round"]) == (3, 3, "accepted", 1)
    assert second["ignored_metrics"] == 3 and "client-id" not in second and first["client_id"] == 2


class QueryGrid:
    """Nodes 10.. answer the who-are-you query with partition id node - 10; node 13 claims 0 too."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord

        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            assert m.metadata.message_type == MessageType.QUERY
            out.append(Message(RecordDict({"client": ConfigRecord({"partition-id": 0 if node == 13 else node - 10, "profile": ""})}), reply_to=m))
        return out


def test_simulated_clients_are_named_by_the_partition_id_the_coordinator_learned(tmp_path):
    from flwr.app import ConfigRecord

    strategy = FedsiteStrategy(RunRecorder(tmp_path, FedsiteConfig(clients=4)), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2)
    messages = list(strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(FedsiteConfig().to_flat()), QueryGrid([10, 11, 13])))
    assert len(messages) == 3
    strategy.aggregate_train(1, [reply(10, full(1.0)), reply(11, full(1.0)), reply(13, full(1.0))])
    row = strategy.recorder.finish_round(1, {"eval_loss": 0.0})
    # nodes 10 and 13 both claim partition 0: the first answer takes it, the other is named by its node id
    assert sorted(row["contributors"]) in ([0, 1, 13], [0, 1, 10])
    refused = [r for r in rows_of(tmp_path) if r.get("phase") == "query"]
    assert len(refused) == 1 and refused[0]["status"] == "rejected" and refused[0]["node_id"] in row["contributors"]
    assert f"already belongs to node {({10, 13} - {refused[0]['node_id']}).pop()}" in refused[0]["reason"]


def test_an_unexpected_error_in_one_reply_is_a_rejection(tmp_path, monkeypatch):
    import coordinator.strategy as module

    real = module.read_train_reply

    def flaky(msg, base, **kwargs):
        if msg.metadata.src_node_id == 3:
            raise RuntimeError("bug")
        return real(msg, base, **kwargs)

    monkeypatch.setattr(module, "read_train_reply", flaky)
    strategy = make_strategy(tmp_path)
    arrays, _ = strategy.aggregate_train(1, [reply(2, full(1.0)), reply(3, full(1.0))])
    assert np.allclose(from_array_record(arrays)["l.lora_A.weight"], 1.0)
    assert rows_of(tmp_path)[1]["reason"] == "internal error reading reply: RuntimeError"


def eval_reply(node: int, metrics: dict | None = None, error: str | None = None) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    if error is not None:
        return Message(Error(code=1, reason=error), reply_to=request)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=request)


def test_federated_evaluation_is_checked_and_capped(tmp_path):
    strategy = make_strategy(tmp_path)
    good = eval_reply(2, {"num-examples": 8, "eval-loss": 1.0, "eval-accuracy": 0.5})
    bad = [
        eval_reply(3, {"num-examples": 10**12, "eval-loss": 0.0, "eval-accuracy": 1.0}),  # capped at client-eval-examples (16)
        eval_reply(4, {"num-examples": 8, "eval-accuracy": 1.0}),  # no eval-loss
        eval_reply(5, {"num-examples": 8, "eval-loss": float("nan"), "eval-accuracy": 1.0}),
        eval_reply(6, {"num-examples": 0}),  # no test examples: skipped, not a rejection
        eval_reply(7, error="boom"),
    ]
    result = strategy.aggregate_evaluate(1, [good, *bad])
    assert result["eval-accuracy"] == pytest.approx((8 * 0.5 + 16 * 1.0) / 24) and result["eval-loss"] == pytest.approx(8 / 24)
    rejected = [r for r in rows_of(tmp_path) if r["phase"] == "evaluate"]
    assert [r["node_id"] for r in rejected] == [4, 5, 7] and all(r["status"] == "rejected" and r["reason"] for r in rejected)
    assert strategy.aggregate_evaluate(2, [eval_reply(6, {"num-examples": 0}), eval_reply(5, {"num-examples": 0, "eval-loss": 1.0, "eval-accuracy": 1.0})]) is None


def test_simulated_clients_are_capped_at_the_examples_their_partition_has(tmp_path):
    from flwr.app import ConfigRecord

    sizes = {0: 20, 1: 30}
    strategy = FedsiteStrategy(RunRecorder(tmp_path, FedsiteConfig(clients=2)), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2,
                               assigned_examples=sizes.get)
    strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(FedsiteConfig().to_flat()), QueryGrid([10, 11]))
    arrays, metrics = strategy.aggregate_train(1, [reply(10, full(1.0), 20), reply(11, full(4.0), 5000)])
    assert metrics["num-examples"] == 50 and np.allclose(from_array_record(arrays)["l.lora_A.weight"], (20 + 4 * 30) / 50)


def test_assigned_examples_are_the_partition_sizes_clients_train_on():
    from coordinator.directory import assigned_train_examples
    from finetune.sources import client_splits

    config = FedsiteConfig(model="tiny", clients=3, train_per_task=6, partitioning="dirichlet")
    limit = assigned_train_examples(config)
    assert [limit(p) for p in range(3)] == [len(client_splits(config, {"partition-id": p, "num-partitions": 3})[0]) for p in range(3)]
    assert limit(3) is None and limit(-1) is None
