import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.backbone import load_backbone
from finetune.cache import lora_model
from finetune.evaluate import evaluate
from finetune.lora import LoraSettings, attach_lora, trainable_lora_parameters
from finetune.quantized import (
    QuantizationUnsupported,
    check_mode,
    inference_packed_layers,
    is_quantized,
    keep_trainable_layout,
    load_quantized_backbone,
    model_memory_bytes,
)
from finetune.train import NoGradient, TrainSettings, train
from finetune.quantized_grads import EXAMPLES, compare

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_lora_gradients_after_an_evaluation_match_the_dequantized_fp32_backbone(mode):
    """The order a simulation worker uses: evaluate the cached model, then train on it."""
    runnable(mode)
    row = compare(mode)
    assert row["packed_after_eval"] == 0 and row["missing"] == 0 and row["nonzero_b"] == 8
    assert row["cosine"] > 0.99


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_the_cached_worker_model_trains_after_evaluating(mode):
    runnable(mode)
    model, tokenizer = lora_model("tiny", LoraSettings(rank=4), seed=0, quantize=mode)
    evaluate(model, tokenizer, EXAMPLES[:2], 64, 4)
    # read the parameters directly: a state_dict() call would hide the bug (bitsandbytes unpacks
    # repacked weights when saving them)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}
    train(model, tokenizer, EXAMPLES, TrainSettings(steps=2, batch_size=3, lr=1e-2))
    after = dict(model.named_parameters())
    assert before and all(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_evaluating_leaves_the_frozen_quantized_weights_bit_identical(mode):
    """bitsandbytes' inference repacking rounds 4-bit block scales to bf16 and back (via state_dict):
    the backbone would drift by ~0.1% each time an evaluation ran between two rounds."""
    from finetune.quantized import dequantized_weight
    import bitsandbytes as bnb

    runnable(mode)
    model, tokenizer = load_quantized_backbone("tiny", mode)
    layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    before = [dequantized_weight(m).clone() for m in layers]
    evaluate(model, tokenizer, EXAMPLES[:2], 64, 4)
    model.state_dict()  # what get_lora_arrays / set_lora_arrays call
    assert all(torch.equal(b, dequantized_weight(m)) for b, m in zip(before, layers))


def test_bitsandbytes_inference_repacking_would_train_nothing_and_the_first_step_says_so():
    """What the loader prevents, where this CPU takes bitsandbytes' AVX512-BF16 inference path."""
    runnable("nf4")
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks 4-bit weights here")
    model, tokenizer = load_quantized_backbone("tiny", "nf4")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True  # bitsandbytes' own default
    evaluate(model, tokenizer, EXAMPLES[:2], 64, 4)
    assert inference_packed_layers(model)
    with pytest.raises(QuantizationUnsupported, match="repacked for inference"):
        keep_trainable_layout(model)
    model = attach_lora(model, LoraSettings(rank=4))
    with pytest.raises(NoGradient, match="no gradient for 16 of 16"):
        train(model, tokenizer, EXAMPLES, TrainSettings(steps=1, batch_size=3))


@pytest.mark.parametrize("path", ["avx2", "no-native-library"])
def test_gradients_are_right_on_every_kernel_path_bitsandbytes_can_take(path):
    """Forced in a fresh interpreter: torch's CPU capability lowered to AVX2 (bitsandbytes' AVX-512
    branches off), or bitsandbytes without its native library (pure-PyTorch kernels)."""
    runnable("nf4")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if path == "avx2":
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    done = subprocess.run([sys.executable, str(ROOT / "tests/finetune/bnb_path_probe.py"), path], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if path == "avx2":
        assert result["torch_capability"] == "AVX2" and not result["bnb_avx512"]
    else:
        assert not result["native_library"]
    for row in result["rows"]:
        assert row["missing"] == 0 and row["packed_after_eval"] == 0 and row["cosine"] > 0.99, row
