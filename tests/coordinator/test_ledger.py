"""The local-DP ledger: epsilon recomputed from each client's history, mismatches marked, resumable."""

import json
import math

import numpy as np
import pytest
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator.checkpoint import read_checkpoint, save_checkpoint
from coordinator.ledger import PrivacyLedger, epsilons_match, merged
from coordinator.replies import DPReport
from coordinator.results import RunRecorder
from coordinator.strategy import FedsiteStrategy
from finetune.config import FedsiteConfig
from finetune.privacy import epsilon_for
from protos.tensors import to_array_record
from protos.updates import encode_update

GLOBAL = {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 2), np.float32)}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def report(z=1.0, q=0.1, steps=5, total=5, delta=1e-5, epsilon=None, history=None) -> DPReport:
    if epsilon is None:
        epsilon = epsilon_for(history or [(z, q, total)], delta)
    return DPReport(z, q, steps, total, delta, epsilon)


def test_honest_cumulative_epsilon_matches_over_rounds():
    ledger = PrivacyLedger(delta=1e-5)
    first = ledger.entry(1, 0, 100, report(steps=5, total=5))
    second = ledger.entry(2, 0, 100, report(steps=5, total=10))
    assert not first["epsilon_mismatch"] and not second["epsilon_mismatch"]
    assert second["epsilon"] == pytest.approx(epsilon_for([(1.0, 0.1, 10)], 1e-5)) and second["seen_steps"] == 10
    assert merged([(1.0, 0.1, 5), (2.0, 0.1, 1), (1.0, 0.1, 5)]) == ((1.0, 0.1, 10), (2.0, 0.1, 1))
    # another client's history is its own
    assert not ledger.entry(2, 1, 101, report(steps=5, total=5))["epsilon_mismatch"]


@pytest.mark.parametrize(
    ("dp", "recomputed"),
    [
        (report(z=0.0, epsilon=-3.0), math.inf),  # noiseless: not private at all, whatever it says
        (report(z=0.0, epsilon=0.0), math.inf),
        (report(epsilon=0.01), None),  # understated
        (report(delta=0.5, epsilon=0.01), None),  # a delta other than the run's
        (report(steps=5, total=50, history=[(1.0, 0.1, 50)]), None),  # counts steps the coordinator never saw
    ],
)
def test_dishonest_or_unverifiable_epsilons_are_marked(dp, recomputed):
    entry = PrivacyLedger(delta=1e-5).entry(1, 7, 107, dp)
    assert entry["epsilon_mismatch"] is True and entry["client_epsilon"] == dp.epsilon
    if recomputed is not None:
        assert entry["epsilon"] == recomputed
    assert entry["epsilon"] == pytest.approx(epsilon_for([(dp.noise_multiplier, dp.sample_rate, dp.steps)], 1e-5))


def test_tolerance():
    assert epsilons_match(2.0, 2.0 * (1 + 5e-4)) and not epsilons_match(2.0, 2.0 * (1 + 5e-3))
    assert epsilons_match(math.inf, math.inf) and not epsilons_match(math.inf, 1e300)


def dp_reply(node: int, epsilon: float, total: int) -> Message:
    metrics = {"num-examples": 10, "train-loss": 1.0, "dp-noise-multiplier": 1.0, "dp-sample-rate": 0.1, "dp-steps": 5.0,
               "dp-total-steps": float(total), "dp-delta": 1e-5, "dp-epsilon": epsilon, "client-id": 0}
    payload = encode_update({k: v + 0.1 for k, v in GLOBAL.items()}, GLOBAL)
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": to_array_record(payload), "metrics": MetricRecord(metrics)}), reply_to=request)


def test_strategy_ledger_survives_a_checkpoint(tmp_path):
    config = FedsiteConfig(dp="local", out=str(tmp_path))
    recorder = RunRecorder(tmp_path, config)
    strategy = FedsiteStrategy(recorder, fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2)
    strategy._global = GLOBAL
    honest = lambda total: epsilon_for([(1.0, 0.1, total)], 1e-5)  # noqa: E731
    strategy.aggregate_train(1, [dp_reply(2, honest(5), 5), dp_reply(3, 9.0, 5)])
    save_checkpoint(recorder, 1, GLOBAL, strategy_state=strategy.state_dict())

    resumed = FedsiteStrategy(RunRecorder(tmp_path, config, fresh=False), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2)
    resumed._global = GLOBAL
    resumed.load_state_dict(read_checkpoint(tmp_path).meta["strategy"])
    resumed.aggregate_train(1, [dp_reply(2, honest(10), 10)])  # cumulative over both rounds
    ledger = [json.loads(line) for line in (tmp_path / "privacy.jsonl").read_text().splitlines()]
    assert [(e["client"], e["epsilon_mismatch"]) for e in ledger] == [(2, False), (3, True), (2, False)]
    assert ledger[-1]["seen_steps"] == 10 and ledger[-1]["epsilon"] == pytest.approx(honest(10))
    assert all(e["node_id"] == e["client"] for e in ledger)  # no query round here: named by node id, never by client-id
