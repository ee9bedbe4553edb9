"""The adaptive codec: precision by norm share, byte budget, exact decoding per precision, hostile tags."""

import numpy as np
import pytest

from finetune.config import ConfigError, FedsiteConfig
from protos.adaptive import PRECISIONS, choose_precisions, encode_adaptive, module_of, payload_nbytes
from protos.codecs import HEADER_KEY, CodecError, decode, encode, encoded_nbytes
from protos.updates import decode_update, encode_update


def lora_update(seed: int = 0, layers: int = 6, scales=None) -> dict[str, np.ndarray]:
    """A and B of q/v in `layers` layers; `scales` sets each module's magnitude (importance)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(layers):
        for target in ("q_proj", "v_proj"):
            scale = scales[(i, target)] if scales and (i, target) in scales else 1e-3
            out[f"m.layers.{i}.{target}.lora_A.weight"] = (rng.standard_normal((4, 96)) * scale).astype(np.float32)
            out[f"m.layers.{i}.{target}.lora_B.weight"] = (rng.standard_normal((96, 4)) * scale).astype(np.float32)
    return out


def test_modules_pair_a_and_b():
    assert module_of("m.layers.0.q_proj.lora_A.weight") == module_of("m.layers.0.q_proj.lora_B.weight")
    assert module_of("m.layers.0.q_proj.lora_A.weight") != module_of("m.layers.0.v_proj.lora_A.weight")


def test_precision_follows_the_share_of_the_norm():
    update = lora_update(scales={(0, "q_proj"): 1.0, (1, "v_proj"): 1e-6})
    chosen = choose_precisions(update)
    assert chosen["m.layers.0.q_proj.lora_A.weight"] == chosen["m.layers.0.q_proj.lora_B.weight"] == "fp16"  # most of the norm
    assert chosen["m.layers.1.v_proj.lora_B.weight"] == "4bit"  # least
    assert set(chosen.values()) <= set(PRECISIONS)


@pytest.mark.parametrize("budget_fraction", [1.0, 0.6, 0.35, 0.0])
def test_stays_within_its_byte_budget(budget_fraction):
    update = lora_update(scales={(i, "q_proj"): 10.0 ** -i for i in range(6)})
    shapes = {k: v.shape for k, v in update.items()}
    smallest = payload_nbytes(shapes, dict.fromkeys(update, "4bit"))
    free = encoded_nbytes(encode_adaptive(update))  # without a budget
    assert free > smallest
    budget = int(smallest + budget_fraction * (free - smallest))
    payload = encode_adaptive(update, budget)
    assert encoded_nbytes(payload) <= budget
    assert encoded_nbytes(payload) == payload_nbytes(shapes, choose_precisions(update, budget))  # the size model is exact
    if budget_fraction < 1.0:
        assert encoded_nbytes(payload) < free  # the budget did bind


def test_a_budget_below_the_smallest_size_is_one_line_error():
    with pytest.raises(CodecError, match="upload budget 100 bytes.*raise upload-budget-mb"):
        encode_adaptive(lora_update(), 100)


def test_decoding_is_exact_for_each_chosen_precision():
    update = lora_update(seed=3, scales={(0, "q_proj"): 1.0, (2, "v_proj"): 0.3, (5, "q_proj"): 1e-6})
    payload = encode_adaptive(update)
    chosen = choose_precisions(update)
    assert {"fp16", "int8", "4bit"} <= set(chosen.values())
    decoded = decode(payload)
    assert list(decoded) == list(update)
    for name, value in update.items():
        alone = decode(encode({name: value}, chosen[name]))[name]
        np.testing.assert_array_equal(decoded[name], alone)  # bit for bit the fixed codec's result


def test_through_the_update_path_and_error_feedback():
    received = {k: np.zeros_like(v) for k, v in lora_update().items()}
    trained = lora_update(seed=5)
    payload = encode_update(trained, received, "adaptive", budget_bytes=0)
    back = decode_update(payload, received)
    assert all(np.abs(back[k] - trained[k]).max() < 1e-3 for k in trained)


def tampered(change) -> dict:
    payload = encode_adaptive(lora_update(scales={(0, "q_proj"): 1.0}))
    change(payload)
    return payload


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda p: p.__setitem__("m.layers.0.q_proj.lora_A.weight::prec", np.array([3], np.uint8)), "precision tag"),
        (lambda p: p.__setitem__("m.layers.0.q_proj.lora_A.weight::prec", np.array([0, 0], np.uint8)), "precision tag"),
        (lambda p: p.__setitem__("m.layers.0.q_proj.lora_A.weight::prec", np.array([0.0], np.float32)), "precision tag"),
        (lambda p: p.pop("m.layers.1.v_proj.lora_B.weight::prec"), "missing precision tag"),
        # a tensor tagged fp16 whose parts are int8's: the fp16 decoder refuses the parts
        (lambda p: [p.__setitem__(k, np.array([0], np.uint8)) for k in list(p) if k.endswith("::prec") and "layers.5" in k], "expected|unexpected"),
        (lambda p: p.__setitem__("m.layers.0.q_proj.lora_A.weight::shape", np.array([4, 97], np.int32)), "shape"),
    ],
)
def test_hostile_tags_and_parts_are_rejected(change, match):
    payload = tampered(change)
    received = {k: np.zeros_like(v) for k, v in lora_update().items()}
    with pytest.raises(CodecError, match=match):
        decode_update(payload, received)


def test_header_must_be_exact():
    payload = encode_adaptive(lora_update())
    payload[HEADER_KEY] = np.frombuffer(b"adaptivex", np.uint8).copy()
    with pytest.raises(CodecError, match="unknown codec"):
        decode(payload)


def test_config_refuses_adaptive_with_secure_and_topk():
    assert FedsiteConfig(upload_codec="adaptive", upload_budget_mb=0.5).validate()
    with pytest.raises(ConfigError, match="^config field 'upload-codec' = 'adaptive' must be fp32 with secure aggregation"):
        FedsiteConfig(upload_codec="adaptive", secure=True).validate()
    with pytest.raises(ConfigError, match="upload-topk"):
        FedsiteConfig(upload_codec="adaptive", upload_topk=0.1).validate()
    with pytest.raises(ConfigError, match="upload-budget-mb"):
        FedsiteConfig(upload_codec="adaptive", upload_budget_mb=-1.0).validate()
