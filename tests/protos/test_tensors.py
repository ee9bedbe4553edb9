"""Named arrays survive the trip through a Flower ArrayRecord bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord

from protos.tensors import from_array_record, nbytes, to_array_record


def test_round_trip_is_exact_and_order_preserving():
    rng = np.random.default_rng(0)
    named = {
        "z.lora_B.weight": rng.standard_normal((576, 8)).astype(np.float32),
        "a.lora_A.weight": rng.standard_normal((8, 576)).astype(np.float32),
        "half": rng.standard_normal(7).astype(np.float16),
        "codes": np.arange(11, dtype=np.uint8),
        "idx": np.array([3, 1], np.int32),
        "scalar": np.array(2.5, np.float64),
        "empty": np.zeros((0, 4), np.float32),
        "special": np.array([np.nan, -0.0, np.inf, 1e-45], np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((3, 5)).astype(np.float32)),
    }
    record = to_array_record(named)
    assert isinstance(record, ArrayRecord)
    back = from_array_record(record)
    assert list(back) == list(named)
    for name, value in named.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        assert back[name].tobytes() == np.ascontiguousarray(value).tobytes(), name
    assert nbytes(back) == nbytes(named) == sum(v.nbytes for v in named.values())


def test_rejects_non_numeric_arrays():
    with pytest.raises(TypeError, match="'bad'"):
        to_array_record({"bad": np.array(["x"])})
