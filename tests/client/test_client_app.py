"""The plain ClientApp's train handler, driven with a real train message on the tiny model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import train_handler
from finetune.cache import initial_lora_arrays, lora_model
from finetune.config import FedsiteConfig
from protos.tensors import from_array_record, to_array_record
from tests.finetune.test_train_eval import cut_gradients_at_the_last_norm

pytestmark = pytest.mark.usefixtures("serverapp_identity")

CONFIG = FedsiteConfig(model="tiny", clients=2, train_per_task=4, test_per_task=2, local_steps=2, batch_size=2)


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


HEAVY = ("torch", "transformers", "peft")


def test_the_forwarding_client_app_imports_no_torch_transformers_or_peft():
    """Flower starts a process per message; deployed, it loads this module and forwards."""
    code = (
        "import sys, client.client_app, client.forwarder, client.wire, client.private_socket, client.worker; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} | {m for m in sys.modules if m.startswith('client.')})))"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True)
    modules = set(result.stdout.split())
    assert "flwr" in modules and "client.client_app" in modules
    assert not modules & {*HEAVY, "client.handlers", "finetune"}
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY)


def test_the_handlers_helpers_stay_importable_from_the_client_app():
    from client import client_app, handlers
    from client.client_app import local_evaluation, local_training, run_config_from

    assert (local_training, local_evaluation, run_config_from) == (handlers.local_training, handlers.local_evaluation, handlers.run_config_from)
    with pytest.raises(AttributeError):
        client_app.no_such_helper  # noqa: B018
