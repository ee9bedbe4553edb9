"""The planner: packages from profiles, per-client messages, HetLoRA ranks, stragglers, dropouts."""

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator.aggregate import Aggregator
from coordinator.planner import DeviceProfile, Planner, choose_codec, plan_package, simulated_seconds
from coordinator.results import RunRecorder
from coordinator.strategy import FedsiteStrategy
from finetune.config import FedsiteConfig
from protos.tensors import from_array_record, to_array_record
from protos.updates import encode_update

RUN = FedsiteConfig(lora_rank=8, lora_alpha=16, clients=4).to_flat()
GLOBAL = {"l.lora_A.weight": np.arange(24, dtype=np.float32).reshape(8, 3), "l.lora_B.weight": np.ones((3, 8), np.float32)}
FAST = DeviceProfile("fast", share=0.5, bandwidth_mbps=100.0)
PHONE = DeviceProfile("phone", share=0.5, speed=0.25, bandwidth_mbps=1.0, quantized=True, lora_rank=4)


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


@dataclass
class FakePopulation:
    """Partition id p is node 100 + p; events by partition id; everything else trains."""

    profiles: dict[int, DeviceProfile]
    events: dict[int, str] = field(default_factory=dict)
    deadline: float = 0.0
    upload_seconds: float = 1.0

    def profile_of(self, pid: int) -> DeviceProfile:
        return self.profiles[pid]

    def event(self, server_round: int, pid: int) -> str:
        return self.events.get(pid, "train")


class FakeGrid:
    """Answers query messages the way the ClientApp's query handler does."""

    def __init__(self) -> None:
        self.queried: list[int] = []

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == MessageType.QUERY
            self.queried.append(msg.metadata.dst_node_id)
            info = ConfigRecord({"partition-id": msg.metadata.dst_node_id - 100, "profile": ""})
            replies.append(Message(content=RecordDict({"client": info}), reply_to=msg))
        return replies


def sampled(nodes: list[int]) -> list[Message]:
    record = RecordDict({"arrays": to_array_record(GLOBAL), "config": ConfigRecord({**RUN, "server-round": 1})})
    return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]


def test_codec_follows_bandwidth():
    values = 1_000_000
    assert choose_codec(values, 1000.0, 1.0) == "fp32"
    assert choose_codec(values, 20.0, 1.0) == "fp16"
    assert choose_codec(values, 10.0, 1.0) == "int8"
    assert choose_codec(values, 0.1, 1.0) == "4bit"


def test_package_from_profile():
    phone = plan_package(PHONE, RUN, 1000, 1.0, rule="hetlora")
    assert (phone.lora_rank, phone.lora_alpha, phone.quantize, phone.kind) == (4, 8, "nf4", "lora")  # alpha/r kept at 2
    assert plan_package(PHONE, RUN, 1000, 1.0, rule="fedavg").lora_rank == 8  # smaller ranks only with hetlora
    kiosk = DeviceProfile("kiosk", holds_backbone=False)
    assert plan_package(kiosk, RUN, 1000, 1.0).kind == "emulator"
    small = DeviceProfile("small", memory_gb=1.0)
    assert plan_package(small, RUN, 1000, 1.0, backbone_gb=4.0).quantize == "nf4"  # fp32 does not fit, 4-bit does
    assert plan_package(small, RUN, 1000, 1.0, backbone_gb=40.0).kind == "emulator"
    pinned = DeviceProfile("pinned", bandwidth_mbps=0.01, upload_codec="fp16")
    assert plan_package(pinned, RUN, 1000, 1.0).upload_codec == "fp16"


def test_simulated_time_is_transfer_plus_scaled_compute():
    profile = DeviceProfile("p", speed=0.5, bandwidth_mbps=8.0)  # 1 MB/s
    assert simulated_seconds(profile, 2.0, 1e6, 3e6) == pytest.approx(3.0 + 4.0 + 1.0)
    # counted: 10 GFLOPs at 5 GFLOP/s is 2 s at speed 1, 4 s at 0.5, whatever this machine measured
    assert simulated_seconds(profile, 9.0, 1e6, 3e6, gflops=10.0, simulated_gflops=5.0) == pytest.approx(3.0 + 4.0 + 1.0)


def test_each_client_gets_its_own_package_and_unreachable_ones_nothing():
    population = FakePopulation({0: FAST, 1: PHONE, 2: FAST, 3: PHONE}, events={2: "unavailable", 3: "dropout"})
    planner, grid = Planner(population, RUN, "hetlora"), FakeGrid()
    messages = planner.plan_round(1, sampled([100, 101, 102, 103]), to_array_record(GLOBAL), grid)
    assert sorted(grid.queried) == [100, 101, 102, 103]
    assert [m.metadata.dst_node_id for m in messages] == [100, 101]
    fast, phone = (m.content for m in messages)
    assert fast["config"]["lora-rank"] == 8 and fast["config"]["quantize"] == "none" and fast["config"]["profile"] == "fast"
    assert phone["config"]["lora-rank"] == 4 and phone["config"]["quantize"] == "nf4" and phone["config"]["server-round"] == 1
    assert fast["config"] is not phone["config"]
    np.testing.assert_array_equal(from_array_record(phone["arrays"])["l.lora_A.weight"], GLOBAL["l.lora_A.weight"][:4])
    record = planner.round_record()
    assert record["unavailable"] == [2] and record["dropped"] == [3] and record["profiles"] == {"fast": 1, "phone": 1}
    planner.plan_round(2, sampled([100, 101]), to_array_record(GLOBAL), grid)
    assert len(grid.queried) == 4  # a node is asked who it is once


def reply(node: int, trained: dict, base: dict, seconds: float, examples: int = 10) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    payload = encode_update(trained, base)
    metrics = MetricRecord({"num-examples": examples, "train-loss": 1.0, "train-seconds": seconds, "upload-bytes": 100})
    return Message(content=RecordDict({"arrays": to_array_record(payload), "metrics": metrics}), reply_to=request)


def test_strategy_pads_small_ranks_and_drops_stragglers(tmp_path):
    population = FakePopulation({0: FAST, 1: PHONE, 2: PHONE}, deadline=10.0)
    planner = Planner(population, {**RUN, "clients": 3}, "hetlora")
    strategy = FedsiteStrategy(RunRecorder(tmp_path, FedsiteConfig()), Aggregator("hetlora"), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2, planner=planner)
    strategy._global = GLOBAL
    planner.plan_round(1, sampled([100, 101, 102]), to_array_record(GLOBAL), FakeGrid())
    small = {k: (v[:4] if "lora_A" in k else v[:, :4]) for k, v in GLOBAL.items()}
    trained_small = {k: v + 1.0 for k, v in small.items()}
    replies = [
        reply(100, {k: v + 1.0 for k, v in GLOBAL.items()}, GLOBAL, seconds=1.0),
        reply(101, trained_small, small, seconds=1.0),  # 1 / 0.25 = 4 s: in time
        reply(102, trained_small, small, seconds=5.0),  # 20 s: past the 10 s deadline
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    a = from_array_record(arrays)["l.lora_A.weight"]
    np.testing.assert_allclose(a[:4], GLOBAL["l.lora_A.weight"][:4] + 1.0)  # both contributors trained rows 0-3
    np.testing.assert_allclose(a[4:], (GLOBAL["l.lora_A.weight"][4:] + 1.0) / 2)  # the phone's padded zeros dilute the tail
    strategy.recorder.finish_round(1, {"eval_loss": 1.0})
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["contributors"] == [100, 101] and row["stragglers"] == [2]
    assert row["simulated_seconds"] == 10.0  # the coordinator waited until the deadline
    assert "straggler" in row["rejected"][0]["reason"]
    clients = [json.loads(line) for line in (tmp_path / "clients.jsonl").read_text().splitlines()]
    assert [c["profile"] for c in clients] == ["fast", "phone", "phone"] and clients[1]["lora_rank"] == 4


def test_smaller_rank_update_is_rejected_without_hetlora(tmp_path):
    population = FakePopulation({0: FAST, 1: PHONE})
    planner = Planner(population, {**RUN, "clients": 2}, "fedavg")
    strategy = FedsiteStrategy(RunRecorder(tmp_path, FedsiteConfig()), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2, planner=planner)
    strategy._global = GLOBAL
    messages = planner.plan_round(1, sampled([100, 101]), to_array_record(GLOBAL), FakeGrid())
    assert all(m.content["config"]["lora-rank"] == 8 for m in messages)
    small = {k: (v[:4] if "lora_A" in k else v[:, :4]) for k, v in GLOBAL.items()}
    strategy.aggregate_train(1, [reply(100, GLOBAL, GLOBAL, 1.0), reply(101, small, small, 1.0)])
    rejected = [json.loads(line) for line in (tmp_path / "clients.jsonl").read_text().splitlines()][1]
    assert rejected["status"] == "rejected" and "shape" in rejected["reason"]


def test_base_rules_refuse_quantized_profiles_and_flora_takes_small_ranks():
    with pytest.raises(ValueError, match="'phone' is quantized"):
        Planner(FakePopulation({0: FAST, 1: PHONE}), {**RUN, "clients": 2}, "fedex-lora")
    small = DeviceProfile("small", share=0.5, lora_rank=4)
    package = plan_package(small, RUN, 1000, 1.0, rule="flora")
    assert package.lora_rank == 4 and package.quantize == "none"
