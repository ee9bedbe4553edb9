import numpy as np
import pytest

from protos.codecs import CodecError, ErrorFeedback, encoded_nbytes
from protos.updates import decode_update, encode_update

rng = np.random.default_rng(0)
GLOBAL = {"m.lora_A.weight": rng.standard_normal((8, 64)).astype(np.float32), "m.lora_B.weight": np.zeros((64, 8), np.float32)}
TRAINED = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in GLOBAL.items()}


@pytest.mark.parametrize("codec,tol", [("fp32", 1e-6), ("fp16", 1e-4), ("int8", 2e-4), ("4bit", 5e-3)])
def test_round_trip_reconstructs_trained_arrays(codec, tol):
    back = decode_update(encode_update(TRAINED, GLOBAL, codec), GLOBAL)
    for key in GLOBAL:
        assert back[key].dtype == np.float32
        assert np.max(np.abs(back[key] - TRAINED[key])) < tol, (codec, key)


def test_compressed_payload_is_smaller():
    sizes = {c: encoded_nbytes(encode_update(TRAINED, GLOBAL, c)) for c in ("fp32", "int8", "4bit")}
    assert sizes["fp32"] / sizes["int8"] > 3.5 and sizes["fp32"] / sizes["4bit"] > 6


def test_error_feedback_carries_the_residual():
    feedback = ErrorFeedback()
    encode_update(TRAINED, GLOBAL, "int8", topk=0.1, feedback=feedback)
    assert any(np.abs(v).sum() > 0 for v in feedback.state_dict().values())


def test_mismatched_keys_pass_through_for_validation():
    payload = encode_update({"other.weight": np.ones((2, 2), np.float32)}, {"other.weight": np.zeros((2, 2), np.float32)}, "fp32")
    assert set(decode_update(payload, GLOBAL)) == {"other.weight"}


def test_tampered_payload_raises():
    payload = encode_update(TRAINED, GLOBAL, "int8")
    payload["m.lora_A.weight::q"] = payload["m.lora_A.weight::q"][:-3]
    with pytest.raises(CodecError, match="m.lora_A.weight"):
        decode_update(payload, GLOBAL)
