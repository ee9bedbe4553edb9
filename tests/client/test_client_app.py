"""The plain ClientApp's train handler, driven with a real train message on the tiny model."""

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import train_handler
from finetune.cache import initial_lora_arrays, lora_model
from finetune.config import FedsiteConfig
from protos.tensors import from_array_record, to_array_record
from tests.finetune.test_train_eval import cut_gradients_at_the_last_norm

CONFIG = FedsiteConfig(model="tiny", clients=2, train_per_task=4, test_per_task=2, local_steps=2, batch_size=2)


@pytest.fixture(autouse=True)
def serverapp_identity():
    """Messages take their sender from the process's task identity, which Flower's runtime sets."""
    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


def train_message(config: FedsiteConfig) -> Message:
    arrays = initial_lora_arrays(config.model, config.lora_settings(), config.seed)
    content = RecordDict({"arrays": to_array_record(arrays), "config": ConfigRecord({**config.to_flat(), "server-round": 1})})
    return Message(content=content, dst_node_id=5, message_type="train")


def context(tmp_path) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)}, state=RecordDict(), run_config={})


def test_a_client_whose_training_computes_no_gradient_declines_and_says_why(tmp_path):
    model, _ = lora_model(CONFIG.model, CONFIG.lora_settings(), CONFIG.seed, CONFIG.quantize)
    handle = cut_gradients_at_the_last_norm(model, "drop")
    try:
        reply = train_handler(train_message(CONFIG), context(tmp_path))
    finally:
        handle.remove()
    assert "arrays" not in reply.content.array_records
    assert "no gradient" in reply.content["declined"]["reason"]
    assert reply.content["metrics"]["num-examples"] == 0


def test_a_client_that_trains_replies_with_its_update(tmp_path):
    reply = train_handler(train_message(CONFIG), context(tmp_path))
    assert "declined" not in reply.content.config_records
    assert from_array_record(reply.content["arrays"]) and reply.content["metrics"]["num-examples"] > 0
