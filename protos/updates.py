"""A client's update on the wire: its change from the global arrays it received, encoded.

Sending the delta (not the trained weights) is what makes lossy codecs and top-k useful: a
delta is small and sparse-ish, the weights are not. The coordinator adds the decoded delta
back onto the same global arrays, so aggregation rules still see whole LoRA factors.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protos.codecs import ErrorFeedback, decode, encode


def encode_update(
    trained: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    codec: str = "fp32",
    topk: float | None = None,
    feedback: ErrorFeedback | None = None,
    budget_bytes: int = 0,
) -> dict[str, np.ndarray]:
    """Encode `trained - received` with `codec` (through error feedback when given); `budget_bytes`
    bounds the adaptive codec's payload (0 = none)."""
    delta = {key: np.asarray(value, np.float32) - np.asarray(received[key], np.float32) for key, value in trained.items()}
    if feedback is not None:
        return feedback.encode(delta, codec, topk, budget_bytes)
    return encode(delta, codec, topk, budget_bytes)


def decode_update(payload: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The client's trained arrays: `received + decoded delta`, in the received dtypes.

    A tensor of `received` must come back in its shape, checked before decoding allocates it
    (CodecError otherwise); keys `received` lacks are passed through (dense only) so that update
    validation rejects them with its own reason. Raises CodecError on a malformed payload.
    """
    out: dict[str, np.ndarray] = {}
    expected = {key: tuple(np.shape(value)) for key, value in received.items()}
    for key, delta in decode(payload, expected).items():
        base = received.get(key)
        if base is None:
            out[key] = delta
        else:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is Inf, which validation rejects
                out[key] = (base.astype(np.float32) + delta).astype(base.dtype)
    return out
