"""The base-weight channel of fedex-lora / flora: W0 + ΔW on the model, exact merged export."""

import numpy as np
import pytest
import torch
from peft import PeftModel

from finetune.backbone import build_tiny_llama
from finetune.base_delta import apply_base_delta, export_merged_adapter, join_base, merged_adapter, set_global_arrays, split_base
from finetune.lora import LoraSettings, attach_lora, get_lora_arrays

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def q0_weight(model) -> torch.Tensor:
    return model.get_submodule(Q0).base_layer.weight.detach().clone()


def random_global(model, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    lora = {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in get_lora_arrays(model).items()}
    prefixes = {k.rsplit(".lora_", 1)[0] for k in lora}
    base = {p: (0.05 * rng.standard_normal(tuple(model.get_submodule(p).base_layer.weight.shape))).astype(np.float32) for p in prefixes}
    return lora, base


def test_delta_sets_w0_plus_delta_without_accumulating_and_restores_w0():
    model = attach_lora(build_tiny_llama(), LoraSettings())
    w0 = q0_weight(model)
    d1, d2 = np.full(tuple(w0.shape), 0.5, np.float32), np.full(tuple(w0.shape), -0.25, np.float32)
    apply_base_delta(model, {Q0: d1})
    assert torch.allclose(q0_weight(model), w0 + 0.5)
    apply_base_delta(model, {Q0: d2})  # the next round's delta replaces the last one
    assert torch.allclose(q0_weight(model), w0 - 0.25)
    apply_base_delta(model, {})  # a run or client without a base update gets W0 back exactly
    assert torch.equal(q0_weight(model), w0)


def test_bad_deltas_are_refused_in_one_line():
    model = attach_lora(build_tiny_llama(), LoraSettings())
    with pytest.raises(ValueError, match="shape"):
        apply_base_delta(model, {Q0: np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="no module"):
        apply_base_delta(model, {"base_model.model.nowhere": np.zeros((3, 3), np.float32)})


def test_split_and_join_round_trip():
    lora, base = {"m.lora_A.weight": np.ones((2, 3))}, {"m": np.zeros((4, 3))}
    joined = join_base(lora, base)
    assert set(joined) == {"m.lora_A.weight", "base/m"}
    back_lora, back_base = split_base(joined)
    assert back_lora.keys() == lora.keys() and back_base.keys() == base.keys()


def test_merged_adapter_is_exact_and_loads_in_stock_peft(tmp_path):
    """Export of ΔW + s·B@A as a higher-rank PEFT adapter: stock PeftModel.from_pretrained on a
    fresh backbone gives the logits of the model that holds the base update and the LoRA."""
    model = attach_lora(build_tiny_llama(), LoraSettings(rank=4, alpha=8))
    lora, base = random_global(model)
    set_global_arrays(model, join_base(lora, base))
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_merged_adapter(model, lora, base, tmp_path / "adapter", "tiny")
    loaded = PeftModel.from_pretrained(build_tiny_llama(), str(tmp_path / "adapter"))
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert loaded.peft_config["default"].r > 4  # the dense base update needs more than rank 4
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_merged_adapter_of_plain_lora_keeps_its_rank():
    model = attach_lora(build_tiny_llama(), LoraSettings(rank=4, alpha=8))
    lora, _ = random_global(model)
    arrays, rank = merged_adapter(lora, {}, scaling=2.0)
    assert rank == 4
    a, b = arrays[f"{Q0}.lora_A.weight"], arrays[f"{Q0}.lora_B.weight"]
    np.testing.assert_allclose(b @ a, 2.0 * lora[f"{Q0}.lora_B.weight"] @ lora[f"{Q0}.lora_A.weight"], atol=1e-5)


def test_a_quantized_base_cannot_take_a_delta():
    pytest.importorskip("bitsandbytes")
    from finetune.cache import lora_model

    model, _ = lora_model("tiny", LoraSettings(), 0, "nf4")
    w = model.get_submodule(Q0).base_layer.weight
    with pytest.raises(ValueError, match="unquantized backbone"):
        apply_base_delta(model, {Q0: np.zeros(tuple(w.shape), np.float32)})
