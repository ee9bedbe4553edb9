"""A client's training on its device: the fp32 CPU path is bit for bit what plain PEFT + torch
calls give, a bf16 backbone keeps LoRA in fp32, arrays leave as float32 numpy, and a deployed
client trains on its own device, not the coordinator's."""

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Context, RecordDict

from client.handlers import client_device, local_training
from finetune.backbone import build_tiny_llama
from finetune.batches import IGNORE_INDEX, batch_stream, encode_example
from finetune.cache import initial_lora_arrays, lora_model
from finetune.config import FedsiteConfig
from finetune.lora import attach_lora, get_lora_arrays, set_lora_arrays
from finetune.sources import client_splits

CONFIG = FedsiteConfig(model="tiny", clients=2, train_per_task=4, test_per_task=2, local_steps=3, batch_size=2, lr=0.01)
NODE = {"partition-id": 0, "num-partitions": 2}


def context(tmp_path, node=NODE) -> Context:
    return Context(run_id=1, node_id=5, node_config={**node, "state-dir": str(tmp_path)}, state=RecordDict(), run_config={})


def plain_reference(config: FedsiteConfig, received: dict) -> dict[str, np.ndarray]:
    """The same round with plain calls and no device handling at all: a fresh tiny Llama with PEFT
    LoRA, AdamW on the LoRA parameters, the answer-token loss from logits of the answer span."""
    model = attach_lora(build_tiny_llama(), config.lora_settings(), config.seed)
    set_lora_arrays(model, received)
    train, _ = client_splits(config, NODE)
    tokenizer = lora_model(config.model, config.lora_settings(), config.seed, device="cpu", dtype="fp32")[1]
    encoded = [encode_example(tokenizer, ex, config.max_seq_len) for ex in train]
    batches = batch_stream(encoded, config.batch_size, tokenizer.pad_token_id, zlib.crc32(f"{config.seed}/1/0".encode()))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    for _ in range(config.local_steps):
        batch = next(batches)
        labels = batch["labels"][:, 1:]
        first = int((labels != IGNORE_INDEX).any(0).nonzero()[0])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=batch["input_ids"].shape[1] - first).logits[:, :-1]
        tokens = F.cross_entropy(logits.transpose(1, 2).float(), labels[:, first:], ignore_index=IGNORE_INDEX, reduction="none")
        mask = (labels[:, first:] != IGNORE_INDEX).to(tokens.dtype)
        loss = (tokens * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
    return get_lora_arrays(model)


@pytest.mark.parametrize("device, dtype", [("cpu", "fp32"), ("cpu", "auto")])
def test_the_fp32_cpu_path_is_bit_for_bit_the_plain_one(tmp_path, device, dtype):
    config = CONFIG.replace(device=device, dtype=dtype)
    received = initial_lora_arrays(config.model, config.lora_settings(), config.seed, device="cpu", dtype="fp32")
    trained, result, _ = local_training(config, 1, "AB", received, context(tmp_path))
    reference = plain_reference(config, received)
    assert result.steps == config.local_steps and trained.keys() == reference.keys()
    assert all(np.array_equal(trained[k], reference[k]) for k in reference)
    assert any(not np.array_equal(trained[k], received[k]) for k in received)  # it trained
    assert all(type(v) is np.ndarray and v.dtype == np.float32 for v in trained.values())


def test_initial_arrays_are_the_same_for_every_dtype():
    settings = CONFIG.lora_settings()
    fp32 = initial_lora_arrays("tiny", settings, 0, device="cpu", dtype="fp32")
    bf16 = initial_lora_arrays("tiny", settings, 0, device="cpu", dtype="bf16")
    assert all(np.array_equal(fp32[k], bf16[k]) for k in fp32)


def test_a_bf16_backbone_trains_fp32_lora_and_hands_back_fp32_numpy(tmp_path):
    config = CONFIG.replace(device="cpu", dtype="bf16")
    model, _ = lora_model(config.model, config.lora_settings(), config.seed, device="cpu", dtype="bf16")
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert frozen == {torch.bfloat16} and lora == {torch.float32}
    received = initial_lora_arrays(config.model, config.lora_settings(), config.seed)
    trained, result, _ = local_training(config, 1, "AB", received, context(tmp_path))
    assert np.isfinite(result.loss) and all(v.dtype == np.float32 and type(v) is np.ndarray for v in trained.values())
    exact = plain_reference(CONFIG, received)
    changed = [k for k in exact if "lora_B" in k]
    assert all(np.abs(trained[k]).max() > 0 for k in changed)  # gradients reached every LoRA B through the bf16 backbone
    update = np.concatenate([(trained[k] - received[k]).ravel() for k in exact])
    exact_update = np.concatenate([(exact[k] - received[k]).ravel() for k in exact])
    cosine = float(update @ exact_update / (np.linalg.norm(update) * np.linalg.norm(exact_update)))
    assert cosine > 0.9, cosine  # the same update as the fp32 round, up to bf16 rounding


def test_a_deployed_client_trains_on_its_own_device_never_the_coordinators():
    coordinator = CONFIG.replace(device="cuda")
    assert client_device(coordinator, {"partition-id": 0}) == "cuda"  # simulated: the run's device
    assert client_device(coordinator, {"data-path": "/d.jsonl", "device": "cpu"}) == "cpu"  # `fedsite client --device cpu`
    assert client_device(coordinator, {"data-path": "/d.jsonl"}) == "auto"  # a deployed client that named none


def test_a_simulated_client_asked_for_a_device_it_lacks_declines_in_one_line(tmp_path, monkeypatch):
    from flwr.app import ConfigRecord, Message
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from client.handlers import train_handler
    from protos.tensors import to_array_record

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    config = CONFIG.replace(device="cuda:1")
    arrays = initial_lora_arrays(config.model, config.lora_settings(), config.seed)
    msg = Message(content=RecordDict({"arrays": to_array_record(arrays), "config": ConfigRecord({**config.to_flat(), "server-round": 1})}), dst_node_id=5, message_type="train")
    reply = train_handler(msg, context(tmp_path))
    assert reply.content["declined"]["reason"].startswith("device 'cuda:1' is not available on this machine")


def test_dp_sgd_runs_through_a_bf16_backbone_with_fp32_lora():
    from finetune.privacy import DPSettings, train_private
    from finetune.tasks import generate_suite
    from finetune.train import TrainSettings

    model, tokenizer = lora_model("tiny", CONFIG.lora_settings(), 0, device="cpu", dtype="bf16")
    set_lora_arrays(model, initial_lora_arrays("tiny", CONFIG.lora_settings(), 0))
    result, spend, _ = train_private(model, tokenizer, generate_suite(per_task=4, seed=1), TrainSettings(steps=2, batch_size=4), DPSettings(seed=3), None)
    assert np.isfinite(result.loss) and spend.epsilon > 0
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in model.parameters())  # Opacus left nothing behind
