"""Upload codecs: bounded round trips, real size savings, top-k, error feedback, tamper checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from protos.codecs import (
    CODECS,
    HEADER_KEY,
    CodecError,
    ErrorFeedback,
    decode,
    encode,
    encoded_nbytes,
    error_bound,
)
from flwr.app import ArrayRecord

from protos.tensors import PACKED_KEY, from_array_record, nbytes, to_array_record

PREFIX = "base_model.model.model.layers.{}.self_attn.{}_proj.lora_{}.weight"


def lora_update(seed: int = 0, layers: int = 30, r: int = 8) -> dict[str, np.ndarray]:
    """SmolLM2-135M-shaped LoRA update on q/v: 30 layers x 15,360 = 460,800 parameters."""
    rng = np.random.default_rng(seed)
    named = {}
    for i in range(layers):
        for proj, out_dim in (("q", 576), ("v", 192)):
            named[PREFIX.format(i, proj, "A")] = (rng.standard_normal((r, 576)) * 1e-3).astype(np.float32)
            named[PREFIX.format(i, proj, "B")] = (rng.standard_normal((out_dim, r)) * 1e-3).astype(np.float32)
    return named


def odd_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    shapes = {"a": (8, 576), "b": (576, 8), "c": (192, 8), "odd": (7, 13), "one": (1,), "b65": (65,),
              "b129": (129, 3), "scalar": (), "empty": (0, 4)}
    named = {k: (rng.standard_normal(s) * 10.0 ** rng.integers(-4, 1)).astype(np.float32) for k, s in shapes.items()}
    named["zeros"] = np.zeros((8, 576), np.float32)
    named["tiny"] = np.array([1e-40, -3e-41, 5e-45, 2e-38], np.float32)  # subnormal scales
    named["heavy"] = (rng.standard_cauchy(1000) * 1e-3).astype(np.float32)  # outliers within blocks
    return named


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_within_stated_bound(codec):
    named = odd_tensors()
    payload = encode(named, codec)
    for key, value in payload.items():
        assert value.dtype in (np.uint8, np.int8, np.float16, np.float32, np.int32) and value.ndim == 1, key
    decoded = decode(payload)
    assert list(decoded) == list(named)
    for name, original in named.items():
        got = decoded[name]
        assert got.dtype == np.float32 and got.shape == original.shape, name
        err = float(np.abs(got - original).max()) if original.size else 0.0
        assert err <= error_bound(codec, original), (name, err, error_bound(codec, original))
    assert not decoded["zeros"].any()
    # The bounds are the advertised ones, not vacuous.
    peak = float(np.abs(named["a"]).max())
    limit = {"fp32": 0.0, "fp16": peak * 2.0**-11, "int8": peak / 250, "4bit": peak * 0.153}[codec]
    assert error_bound(codec, named["a"]) <= limit


def test_fp32_is_bit_identical():
    named = {**lora_update(layers=1), "special": np.array([np.nan, -0.0, np.inf, 1e-45], np.float32)}
    decoded = decode(encode(named, "fp32"))
    for name, value in named.items():
        assert decoded[name].tobytes() == value.tobytes(), name


def test_4bit_is_bitsandbytes_nf4_blocksize_64():
    import bitsandbytes.functional as bnbf
    import torch

    x = lora_update(layers=1)[PREFIX.format(0, "q", "A")]
    payload = encode({"x": x}, "4bit")
    packed, state = bnbf.quantize_4bit(torch.from_numpy(x.reshape(-1)), blocksize=64, quant_type="nf4")
    assert np.array_equal(payload["x::q"], packed.numpy().reshape(-1))
    assert np.array_equal(payload["x::scale"], state.absmax.numpy())
    assert np.array_equal(decode(payload)["x"].reshape(-1), bnbf.dequantize_4bit(packed, state).numpy().reshape(-1))


def test_size_ratios_against_fp32():
    named = lora_update()
    assert sum(v.size for v in named.values()) == 460_800
    fp32 = encoded_nbytes(encode(named, "fp32"))
    ratios = {codec: fp32 / encoded_nbytes(encode(named, codec)) for codec in CODECS}
    ratios["int8+top10%"] = fp32 / encoded_nbytes(encode(named, "int8", topk=0.1))
    ratios["4bit+top10%"] = fp32 / encoded_nbytes(encode(named, "4bit", topk=0.1))
    print("\nsize vs fp32 (460,800 params, %d bytes): " % fp32 + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    assert 1.99 <= ratios["fp16"] <= 2.0
    assert ratios["int8"] >= 3.8
    assert ratios["4bit"] >= 6.5
    assert ratios["int8+top10%"] >= 7.0
    assert 0.99 <= ratios["fp32"] <= 1.0


def test_topk_keeps_exactly_the_largest_entries():
    rng = np.random.default_rng(2)
    n = 8 * 576
    x = (rng.permutation(n) + 1).astype(np.float32) * rng.choice([-1.0, 1.0], n).astype(np.float32)
    x = x.reshape(8, 576)
    decoded = decode(encode({"x": x}, "fp32", topk=0.1))["x"]
    keep = math.ceil(0.1 * n)
    expected = np.abs(x) > n - keep  # magnitudes are 1..n, all distinct
    assert np.array_equal(decoded != 0, expected)
    assert np.array_equal(decoded[expected], x[expected])
    for codec in ("int8", "4bit"):
        got = decode(encode({"x": x}, codec, topk=0.1))["x"]
        assert np.abs(got - x).max() <= error_bound(codec, x, topk=0.1)
    assert np.count_nonzero(decode(encode({"x": x}, "fp32", topk=1e-9))["x"]) == 1
    with pytest.raises(CodecError, match="topk"):
        encode({"x": x}, "fp32", topk=0.0)


def test_error_feedback_sum_of_sends_tracks_sum_of_updates():
    update = lora_update(layers=2)
    peak = max(float(np.abs(v).max()) for v in update.values())
    ef, total, plain_total = ErrorFeedback(), dict.fromkeys(update, 0.0), dict.fromkeys(update, 0.0)
    rounds, worst_residual = 60, 0.0
    for t in range(1, rounds + 1):
        sent = decode(ef.encode(update, "int8", topk=0.1))
        plain = decode(encode(update, "int8", topk=0.1))
        for name in update:
            total[name] = total[name] + sent[name]
            plain_total[name] = plain_total[name] + plain[name]
            gap = float(np.abs(t * update[name] - total[name]).max())
            assert gap == pytest.approx(float(np.abs(ef.residual[name]).max()), rel=1e-3, abs=1e-6 * t * peak)
            worst_residual = max(worst_residual, gap)
    assert worst_residual <= 5 * peak  # bounded: does not grow with the number of rounds
    ef_err = max(float(np.abs(total[n] / rounds - update[n]).max()) for n in update)
    plain_err = max(float(np.abs(plain_total[n] / rounds - update[n]).max()) for n in update)
    assert ef_err <= worst_residual / rounds + 1e-6 * peak  # mean of sends -> true update as 1/t
    assert ef_err < 0.1 * peak and plain_err > 0.3 * peak  # without feedback top-k bias stays

    # State is plain named arrays: checkpoint through an ArrayRecord and continue identically.
    restored = ErrorFeedback(from_array_record(to_array_record(ef.state_dict())))
    a, b = ef.encode(update, "4bit", topk=0.2), restored.encode(update, "4bit", topk=0.2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # A residual whose shape no longer fits (new rank) is dropped, not broadcast.
    name = next(iter(update))
    ef.encode({name: np.ones((4, 576), np.float32)}, "fp32")
    assert ef.residual[name].shape == (4, 576) and not ef.residual[name].any()


NAME = "layer.lora_A.weight"


def truncate(part):
    return lambda p: p.update({f"{NAME}::{part}": p[f"{NAME}::{part}"][:-1]})


def replace(part, value):
    return lambda p: p.update({f"{NAME}::{part}": value(p[f"{NAME}::{part}"]) if callable(value) else value})


@pytest.mark.parametrize(
    "codec, topk, edit, match",
    [
        ("int8", None, truncate("q"), "q is int8 .*expected"),
        ("4bit", None, truncate("q"), "q is uint8 .*expected"),
        ("fp16", None, truncate("q"), "q is float16 .*expected"),
        ("int8", None, lambda p: p.pop(f"{NAME}::scale"), "missing scale"),
        ("4bit", None, lambda p: p.pop(f"{NAME}::scale"), "missing scale"),
        ("4bit", None, truncate("scale"), "scale is"),
        ("int8", None, replace("scale", lambda s: -s), "scale has negative"),
        ("fp32", None, replace("q", lambda q: q.astype(np.float16)), "q is float16"),
        ("fp32", None, replace("shape", np.array([9, 576], np.int32)), "q is"),
        ("fp32", None, replace("shape", np.array([8, 576], np.int64)), "shape is int64"),
        ("fp32", None, lambda p: p.pop(f"{NAME}::shape"), "missing shape"),
        ("fp32", None, replace("scale", np.ones(1, np.float32)), "unexpected scale"),
        ("int8", None, lambda p: p.update({HEADER_KEY: np.frombuffer(b"fp32", np.uint8)}), "unexpected scale"),
        ("int8", 0.5, replace("idx", lambda i: i[::-1].copy()), "idx must be increasing"),
        ("int8", 0.5, replace("idx", lambda i: i + 1), "idx must be increasing"),
        ("int8", 0.5, lambda p: p.pop(f"{NAME}::idx"), "missing idx"),
        ("int8", 0.5, replace("shape", np.array([2**20, 2**20], np.int32)), "over 268435456 elements"),
        ("fp32", None, replace("shape", np.array([-8, -576], np.int32)), "negative"),
    ],
)
def test_tampered_payload_names_the_tensor(codec, topk, edit, match):
    payload = encode({NAME: np.linspace(-1, 1, 8 * 576, dtype=np.float32).reshape(8, 576)}, codec, topk)
    edit(payload)
    with pytest.raises(CodecError, match=match) as info:
        decode(payload)
    assert f"'{NAME}'" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("header", [b"int9", b"", b"4bit+top", b"\xff"])
def test_bad_codec_header(header):
    payload = encode({"w": np.ones(3, np.float32)}, "int8")
    payload[HEADER_KEY] = np.frombuffer(header, np.uint8).copy()
    with pytest.raises(CodecError, match="header"):
        decode(payload)
    del payload[HEADER_KEY]
    with pytest.raises(CodecError, match="no '__codec__' header"):
        decode(payload)


def test_unexpected_key_rejected():
    payload = encode({"w": np.ones(3, np.float32)}, "fp32")
    payload["stray"] = np.ones(1, np.float32)
    with pytest.raises(CodecError, match="unexpected payload key 'stray'"):
        decode(payload)


def test_unknown_codec_name_lists_known_ones():
    for call in (lambda: encode({"w": np.ones(2)}, "int4"), lambda: error_bound("int4", np.ones(2))):
        with pytest.raises(CodecError, match="known codecs: fp32, fp16, int8, 4bit"):
            call()


def test_bad_inputs_rejected():
    with pytest.raises(CodecError, match="'w'"):
        encode({"w": np.array([1.0, np.nan], np.float32)}, "int8")
    with pytest.raises(CodecError, match="'w': values beyond float16 range"):
        encode({"w": np.array([1e5], np.float32)}, "fp16")
    with pytest.raises(CodecError, match="'a::b'"):
        encode({"a::b": np.ones(2)}, "fp32")
    assert np.isnan(decode(encode({"w": np.array([np.nan], np.float32)}, "fp16"))["w"]).all()


@pytest.mark.parametrize("codec", CODECS)
def test_payload_through_array_record(codec):
    named = lora_update(layers=1)
    payload = encode(named, codec, topk=0.25 if codec == "int8" else None)
    record = to_array_record(payload)
    back = from_array_record(record)
    assert list(back) == list(payload)
    assert all(back[k].dtype == payload[k].dtype and back[k].tobytes() == payload[k].tobytes() for k in payload)
    assert encoded_nbytes(back) == encoded_nbytes(payload) == nbytes(payload) < record.count_bytes()
    direct, via_record = decode(payload), decode(record)
    assert all(np.array_equal(direct[k], via_record[k]) for k in named)


# ------------------------------------------------------------------ declared shapes vs what the receiver holds
def test_topk_shape_is_checked_against_the_expected_one_before_allocation():
    import tracemalloc

    payload = encode({"w": np.ones((4, 4), np.float32)}, "fp32", topk=0.25)
    payload["w::shape"] = np.array([2**14, 2**14], np.int32)  # 256 Mi values (1 GiB) from a few bytes
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=r"'w': shape \[16384, 16384\], expected \[4, 4\]"):
            decode(payload, {"w": (4, 4)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    stray = encode({"x": np.ones(8, np.float32)}, "int8", topk=0.5)
    with pytest.raises(CodecError, match="unknown key x"):
        decode(stray, {"w": (4, 4)})
    dense = encode({"x": np.ones(8, np.float32)}, "fp32")
    assert set(decode(dense, {"w": (4, 4)})) == {"x"}  # dense: bounded by the payload, left for validation


def test_malformed_shapes_and_headers_are_one_line_codec_errors():
    payload = encode({"w": np.ones(3, np.float32)}, "fp32")
    payload["w::shape"] = np.ones(65, np.int32)
    with pytest.raises(CodecError, match="65 dimensions, at most 32"):
        decode(payload)
    payload = encode({"w": np.ones(3, np.float32)}, "fp32")
    payload[HEADER_KEY] = np.frombuffer(b"fp32" * 100, np.uint8).copy()
    with pytest.raises(CodecError, match="not a short uint8 ASCII string"):
        decode(payload)


def test_decoding_a_record_never_np_loads_the_bytes():
    from flwr.app import Array

    record = to_array_record(encode({"w": np.ones(3, np.float32)}, "fp32"), packed=False)
    record["w::q"] = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"PK\x03\x04 not an npy")
    with pytest.raises(CodecError, match="'w::q': not a readable .npy buffer") as info:
        decode(record)
    assert "\n" not in str(info.value)
    # the same inside a packed record (the wire form): the inner buffer is named too
    payload = encode({"w": np.ones(3, np.float32)}, "fp32")
    inner = {k: Array(v).data for k, v in payload.items()}
    inner["w::q"] = b"PK\x03\x04 not an npy"
    index = json.dumps([[k, len(v)] for k, v in inner.items()]).encode()
    blob = len(index).to_bytes(8, "little") + index + b"".join(inner.values())
    packed = ArrayRecord(array_dict={PACKED_KEY: Array(np.frombuffer(blob, np.uint8))})
    with pytest.raises(CodecError, match="'w::q': not a readable .npy buffer"):
        decode(packed)
