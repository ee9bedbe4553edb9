import sys

import pytest
import torch

from finetune.backbone import load_backbone
from finetune.lora import LoraSettings, attach_lora, trainable_lora_parameters
from finetune.quantized import (
    QuantizationUnsupported,
    check_mode,
    is_quantized,
    load_quantized_backbone,
    model_memory_bytes,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSITE_CACHE", str(tmp_path))



def runnable(mode: str) -> None:
    try:
        check_mode(mode)
    except QuantizationUnsupported as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_tiny_loads_runs_and_trains_lora(mode):
    runnable(mode)
    model, tokenizer = load_quantized_backbone("tiny", mode)
    assert is_quantized(model) and not any(p.requires_grad for p in model.parameters())
    fp32, _ = load_backbone("tiny")
    assert model_memory_bytes(model) < model_memory_bytes(fp32)
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    model = attach_lora(model, LoraSettings(rank=4))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in name for name in grads)
    assert all(p.dtype == torch.float32 for p in trainable_lora_parameters(model))
    assert any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)


def test_four_bit_is_smaller_than_eight_bit_smaller_than_fp32():
    runnable("nf4")
    runnable("int8")
    fp32 = model_memory_bytes(load_backbone("tiny")[0])
    nf4 = model_memory_bytes(load_quantized_backbone("tiny", "nf4")[0])
    int8 = model_memory_bytes(load_quantized_backbone("tiny", "int8")[0])
    assert nf4 < int8 < fp32


def test_unknown_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match="nf4, int8"):
        load_quantized_backbone("tiny", "fp8")


def test_missing_bitsandbytes_fails_loudly(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(QuantizationUnsupported, match="cannot run on this machine"):
        load_quantized_backbone("tiny", "nf4")


def test_dp_sgd_runs_on_a_quantized_backbone():
    from finetune.examples import Example
    from finetune.privacy import DPSettings, train_private
    from finetune.train import TrainSettings

    runnable("nf4")
    model, tokenizer = load_quantized_backbone("tiny", "nf4")
    model = attach_lora(model, LoraSettings(rank=4))
    examples = [Example("Reverse the word.", w, w[::-1]) for w in ["abc", "dog", "tree", "sun"]]
    result, spend, _ = train_private(model, tokenizer, examples, TrainSettings(steps=2, batch_size=2), DPSettings(seed=0), None)
    assert result.steps == 2 and spend.total_steps == 2 and is_quantized(model)
