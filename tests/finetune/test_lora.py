import numpy as np
import pytest
from peft import PeftModel

from finetune.backbone import build_tiny_llama
from finetune.lora import LoraSettings, attach_lora, export_adapter, get_lora_arrays, set_lora_arrays


def test_only_lora_is_trainable(tiny):
    model = attach_lora(tiny[0], LoraSettings(rank=4, targets=("q_proj", "v_proj", "o_proj")))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    arrays = get_lora_arrays(model)
    assert len(arrays) == 4 * 3 * 2  # layers x targets x (A, B)
    a = next(v for k, v in arrays.items() if k.endswith("q_proj.lora_A.weight"))
    assert a.shape == (4, 64)


def test_round_trip_is_bit_identical(tiny):
    model = attach_lora(tiny[0], LoraSettings())
    rng = np.random.default_rng(0)
    arrays = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in get_lora_arrays(model).items()}
    set_lora_arrays(model, arrays)
    back = get_lora_arrays(model)
    assert list(back) == list(arrays)
    for key in arrays:
        assert back[key].tobytes() == arrays[key].tobytes()


def test_init_is_deterministic_by_seed(tiny):
    a = get_lora_arrays(attach_lora(build_tiny_llama(), LoraSettings(), seed=3))
    b = get_lora_arrays(attach_lora(build_tiny_llama(), LoraSettings(), seed=3))
    c = get_lora_arrays(attach_lora(build_tiny_llama(), LoraSettings(), seed=4))
    key = next(k for k in a if "lora_A" in k)
    assert np.array_equal(a[key], b[key]) and not np.array_equal(a[key], c[key])


def test_mismatched_arrays_are_refused(tiny):
    model = attach_lora(tiny[0], LoraSettings())
    arrays = get_lora_arrays(model)
    key = next(iter(arrays))
    with pytest.raises(ValueError, match="shape"):
        set_lora_arrays(model, {**arrays, key: np.zeros((1, 1), np.float32)})
    with pytest.raises(ValueError, match="missing"):
        set_lora_arrays(model, {k: v for k, v in arrays.items() if k != key})
    with pytest.raises(ValueError, match="unknown"):
        set_lora_arrays(model, {**arrays, "extra.weight": arrays[key]})


def test_export_loads_with_stock_peft(tiny, tmp_path):
    model = attach_lora(tiny[0], LoraSettings(rank=4))
    rng = np.random.default_rng(1)
    arrays = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in get_lora_arrays(model).items()}
    set_lora_arrays(model, arrays)
    export_adapter(model, tmp_path / "adapter", "tiny")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(build_tiny_llama(), tmp_path / "adapter")
    for key, value in get_lora_arrays(loaded).items():
        assert np.array_equal(value, arrays[key]), key


def test_trainable_factors_can_freeze_a_or_b(tiny):
    from finetune.lora import set_trainable_factors

    model = attach_lora(tiny[0], LoraSettings())
    set_trainable_factors(model, "B")
    grads = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
    assert not any(v for n, v in grads.items() if "lora_A" in n) and all(v for n, v in grads.items() if "lora_B" in n)
    set_trainable_factors(model, "AB")
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="train-factors"):
        set_trainable_factors(model, "C")
