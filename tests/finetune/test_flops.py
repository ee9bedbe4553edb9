"""Training FLOPs counted from the linear layers: hand-computed stacks, LoRA, and what train() reports."""

import pytest
import torch

from finetune.flops import batch_tokens, token_flops
from finetune.lora import LoraSettings, attach_lora
from finetune.train import TrainSettings, train
from tests.finetune.test_train_eval import EXAMPLES


def stack() -> torch.nn.Sequential:
    # 3 -> 4 -> 5 -> 2: 12, 20 and 10 multiply-adds per token
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))


def test_fully_trained_stack_costs_six_n():
    flops = token_flops(stack())
    assert flops.forward == 2 * (12 + 20 + 10)
    # weight gradients everywhere; input gradients past the first layer
    assert flops.backward == 2 * (12 + 20 + 10) + 2 * (20 + 10)
    assert flops.total == pytest.approx(6 * 42 - 2 * 12)


def test_backward_stops_at_the_lowest_trainable_layer():
    model = stack()
    for p in model.parameters():
        p.requires_grad_(False)
    assert token_flops(model).backward == 0.0
    model[3].weight.requires_grad_(True)  # only the top layer trains: its weight gradient, nothing passes below it
    assert token_flops(model) == type(token_flops(model))(2 * 42, 2 * 10)
    model[2].weight.requires_grad_(True)  # one lower: the top layer must now pass its input gradient down
    assert token_flops(model).backward == 2 * 10 + 2 * 20 + 2 * 10


def test_lora_counts_the_frozen_backbone_forward_and_the_backward_down_to_the_lowest_module(tiny):
    model, tokenizer = tiny
    frozen = token_flops(model).forward
    model = attach_lora(model, LoraSettings(rank=4))
    everywhere = token_flops(model)
    assert everywhere.forward > frozen  # the LoRA factors add their own multiply-adds
    # input gradients through (almost) the whole backbone: more than the forward's worth of frozen layers
    assert everywhere.backward > 0.9 * frozen
    # only the top block's modules trainable (Kill-and-Revive keeping high modules): backward is short
    layers = model.base_model.model.model.layers
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(f"layers.{len(layers) - 1}." in name)
    top_only = token_flops(model)
    assert top_only.forward == everywhere.forward and top_only.backward < 0.5 * everywhere.backward


def test_train_reports_the_counted_flops_of_its_batches(tiny, monkeypatch):
    import finetune.train as train_module

    model, tokenizer = tiny
    model = attach_lora(model, LoraSettings(rank=4))
    per_token = token_flops(model).total
    seen = []
    monkeypatch.setattr(train_module, "batch_tokens", lambda batch: seen.append(batch_tokens(batch)) or seen[-1])
    result = train(model, tokenizer, EXAMPLES, TrainSettings(steps=3, batch_size=2))
    assert len(seen) == 3 and result.flops == pytest.approx(per_token * sum(seen)) and result.flops > 0
    assert batch_tokens({"input_ids": torch.zeros(2, 7, dtype=torch.long)}) == 14
