"""A device's accelerator in its profile: what a deployed client reports, how the coordinator
checks it, how the planner packages it, and how an experiment's [[profiles]] name it."""

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from client.handlers import query_handler
from coordinator.planner import plan_package, training_memory_gb
from coordinator.replies import read_query_answer
from finetune.config import FedsiteConfig
from protos.profile import DeviceProfile
from simulations.population import profile_from_mapping

RUN = FedsiteConfig(lora_rank=8, lora_alpha=16, clients=4).to_flat()
DEPLOYED = {"partition-id": -1, "profile": "ws", "holds-backbone": True, "memory-gb": 16.0, "quantized": False}


@pytest.fixture(autouse=True)
def identity(monkeypatch):
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)


def answer(info: dict) -> Message:
    query = Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    return Message(content=RecordDict({"client": ConfigRecord(info)}), reply_to=query)


def test_a_gpu_with_enough_memory_gets_the_full_precision_backbone_whatever_its_host_memory():
    workstation = DeviceProfile("ws", memory_gb=1.0, accelerator="cuda", accelerator_memory_gb=80.0)
    package = plan_package(workstation, RUN, 1000, 1.0, backbone_gb=10.0)
    assert (package.kind, package.quantize) == ("lora", "none")
    assert training_memory_gb(workstation) == 80.0


def test_a_small_gpu_gets_nf4_then_an_emulator_and_cpu_only_devices_keep_todays_rule():
    small_gpu = DeviceProfile("g", memory_gb=64.0, accelerator="cuda", accelerator_memory_gb=4.0)
    assert (plan_package(small_gpu, RUN, 1000, 1.0, backbone_gb=10.0).kind, plan_package(small_gpu, RUN, 1000, 1.0, backbone_gb=10.0).quantize) == ("lora", "nf4")
    assert plan_package(small_gpu, RUN, 1000, 1.0, backbone_gb=40.0).kind == "emulator"
    laptop = DeviceProfile("cpu", memory_gb=2.0)
    assert plan_package(laptop, RUN, 1000, 1.0, backbone_gb=10.0).quantize == "nf4"
    assert plan_package(laptop, RUN, 1000, 1.0, backbone_gb=40.0).kind == "emulator"
    unknown_gpu = DeviceProfile("u", memory_gb=2.0, accelerator="mps")  # memory not reported: host memory bounds it
    assert plan_package(unknown_gpu, RUN, 1000, 1.0, backbone_gb=10.0).quantize == "nf4"


def test_accelerator_fields_are_parsed_and_older_answers_default_to_none():
    parsed, reason = read_query_answer(answer({**DEPLOYED, "accelerator": "cuda", "accelerator-memory-gb": 79.6}))
    assert reason is None and (parsed.accelerator, parsed.accelerator_memory_gb, parsed.memory_gb) == ("cuda", 79.6, 16.0)
    older, reason = read_query_answer(answer(DEPLOYED))
    assert reason is None and (older.accelerator, older.accelerator_memory_gb) == ("none", 0.0)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"accelerator": "tpu"}, "accelerator 'tpu' is not one of none, cuda, mps"),
        ({"accelerator": 1}, "accelerator 1 is not one of"),
        ({"accelerator": "cuda", "accelerator-memory-gb": -1.0}, "accelerator-memory-gb -1.0 is not a number in [0, 1e+06]"),
        ({"accelerator": "cuda", "accelerator-memory-gb": float("nan")}, "accelerator-memory-gb nan"),
        ({"accelerator": "cuda", "accelerator-memory-gb": 1e9}, "accelerator-memory-gb 1000000000.0"),
        ({"accelerator": "cuda", "accelerator-memory-gb": True}, "accelerator-memory-gb True"),
        ({"accelerator": "none", "accelerator-memory-gb": 8.0}, "without an accelerator"),
    ],
)
def test_bad_accelerator_fields_are_refused_with_the_field_named(extra, words):
    parsed, reason = read_query_answer(answer({**DEPLOYED, **extra}))
    assert reason is not None and words in reason, reason
    assert parsed.memory_gb is None  # refused: the node gets the default profile, not half of its claim


def test_a_deployed_client_reports_the_accelerator_of_its_own_device(tmp_path):
    node = {"data-path": str(tmp_path / "d.jsonl"), "holds-backbone": True, "memory-gb": 8.0, "quantized": False, "device": "cpu"}
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    reply = query_handler(Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.QUERY), context)
    info = reply.content["client"]
    assert (info["accelerator"], info["accelerator-memory-gb"]) == ("none", 0.0)
    parsed, reason = read_query_answer(reply)
    assert reason is None and parsed.accelerator == "none"


def test_experiment_profiles_name_an_accelerator():
    profile = profile_from_mapping({"name": "gpu", "accelerator": "cuda", "accelerator-memory-gb": 24})
    assert (profile.accelerator, profile.accelerator_memory_gb) == ("cuda", 24.0)
    with pytest.raises(ValueError, match="profile 'x': accelerator = 'gpu' must be one of none, cuda, mps"):
        profile_from_mapping({"name": "x", "accelerator": "gpu"})
    with pytest.raises(ValueError, match="accelerator-memory-gb = 8.0 must be non-negative, and 0 without an accelerator"):
        profile_from_mapping({"name": "x", "accelerator-memory-gb": 8.0})


class NoPopulation:
    """A run of deployed clients only: every profile is what the node reports."""

    deadline, upload_seconds, profiles = 0.0, 1.0, ()

    def profile_of(self, pid):
        return DeviceProfile("default")

    def event(self, server_round, pid):
        return "train"


class DeviceGrid:
    def send_and_receive(self, messages, timeout=None):
        return [Message(content=RecordDict({"client": ConfigRecord({**DEPLOYED, "accelerator": "cuda", "accelerator-memory-gb": 24.0})}), reply_to=m) for m in messages]


def test_the_planner_keeps_what_a_node_reported_about_its_accelerator():
    from coordinator.planner import Planner

    planner = Planner(NoPopulation(), RUN, backbone_gb=10.0)
    planner._learn_partitions([7], DeviceGrid())
    profile = planner.profile_for(7)
    assert (profile.name, profile.accelerator, profile.accelerator_memory_gb, profile.memory_gb) == ("ws", "cuda", 24.0, 16.0)
    assert plan_package(profile, RUN, 1000, 1.0, backbone_gb=10.0).quantize == "none"
