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


# ------------------------------------------------------------------ hostile bytes
import io
import pickle
import tracemalloc
import zipfile

from flwr.app import Array

from protos.tensors import TensorError


def _record(data: bytes, dtype: str = "float32", shape: tuple = (2,), stype: str = "numpy.ndarray") -> ArrayRecord:
    return ArrayRecord(array_dict={"w": Array(dtype=dtype, shape=shape, stype=stype, data=data)})


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_header(descr: object, shape: tuple, body: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + body


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("w.npy", _npy(np.ones(2, np.float32)))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not a readable .npy buffer"),
        (_npy(np.ones(4, np.float32))[:-3], "declares 16 bytes"),
        (_npy(np.ones(4, np.float32))[:20], "not a readable .npy buffer"),
        (_zip(), "not a readable .npy buffer"),
        (_npy_header("<f4", (2**20, 2**20)), "declares 4398046511104 bytes"),
        (_npy_header("|O", (2,), pickle.dumps([1, 2])), "not a plain numeric dtype"),
        (_npy_header("<U3", (2,), b"\0" * 24), "not a plain numeric dtype"),
        (_npy_header([('a', '<f4')], (2,), b"\0" * 8), "not a plain numeric dtype"),
        (_npy_header("<f4", (-1,)), "non-negative"),
        (_npy_header("<f4", (1,) * 40, b"\0" * 4), "up to 32"),
        (b"\x93NUMPY\x01\x00" + b"\xff\xff" + b"{" * 100, "not a readable .npy buffer"),
    ],
)
def test_hostile_bytes_are_refused_before_allocation(data, match):
    tracemalloc.start()
    try:
        with pytest.raises(TensorError, match=match) as info:
            from_array_record(_record(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value) and "'w'" in str(info.value)
    assert peak < 1 << 20  # never the 4 TiB the header claims


def test_other_serializations_and_budgets_are_refused():
    with pytest.raises(TensorError, match="serialization 'torch'"):
        from_array_record(_record(_npy(np.ones(2, np.float32)), stype="torch"))
    record = to_array_record({"a": np.ones(100, np.float32), "b": np.ones(100, np.float32)})
    assert len(from_array_record(record, max_bytes=800)) == 2
    with pytest.raises(TensorError, match="'b'.*over 799 bytes"):
        from_array_record(record, max_bytes=799)
    with pytest.raises(TensorError, match="expected an ArrayRecord"):
        from_array_record({"a": np.ones(2)})  # type: ignore[arg-type]


def test_fortran_order_and_byte_order_are_read_as_numpy_would():
    value = np.arange(6, dtype=">f4").reshape(2, 3)
    buffer = io.BytesIO()
    np.save(buffer, np.asfortranarray(value))
    back = from_array_record(_record(buffer.getvalue()))["w"]
    assert back.dtype == np.dtype(">f4") and np.array_equal(back, value) and back.flags.writeable


# ------------------------------------------------------------------ the packed wire form

from protos.tensors import MAX_INDEX_BYTES, PACKED_KEY  # noqa: E402


def _packed(index: bytes, body: bytes = b"", length: int | None = None) -> ArrayRecord:
    blob = (len(index) if length is None else length).to_bytes(8, "little") + index + body
    return ArrayRecord(array_dict={PACKED_KEY: Array(np.frombuffer(blob, np.uint8))})


def test_a_record_travels_as_one_array_and_plain_records_still_read():
    named = {f"layer{i}.lora_A": np.full((2, 3), i, np.float32) for i in range(40)}
    packed, plain = to_array_record(named), to_array_record(named, packed=False)
    assert list(packed.keys()) == [PACKED_KEY] and len(plain) == 40
    for record in (packed, plain):
        back = from_array_record(record)
        assert list(back) == list(named) and all(np.array_equal(back[k], named[k]) for k in named)
    assert len(to_array_record({})) == 0 and from_array_record(to_array_record({})) == {}


@pytest.mark.parametrize(
    "record, match",
    [
        (_packed(b"", length=None), "not JSON"),
        (_packed(b"[]", length=1 << 40), "index of 1099511627776 bytes"),
        (_packed(b"{}"), "a dict, expected a list"),
        (_packed(b'[["w", -1]]'), "not \\[name, length\\]"),
        (_packed(b'[["", 0]]'), "not \\[name, length\\]"),
        (_packed(b'[["w", 1.5]]'), "not \\[name, length\\]"),
        (_packed(b'[["w", true]]'), "not \\[name, length\\]"),
        (_packed(b'[["w", 0], ["w", 0]]'), "'w' appears twice"),
        (_packed(b'[["w", 10]]', b"short"), "accounts for 29 bytes but 24"),
        (_packed(b'[["w", 0]]', b"extra"), "accounts for 18 bytes but 23"),
        (_packed(b"[" * 100_000), "not JSON"),
        (_packed(b'[["w", 12]]', b"\x93NUMPY junk!"), "'w': not a readable .npy buffer"),
    ],
)
def test_a_hostile_packed_record_is_a_one_line_error(record, match):
    with pytest.raises(TensorError, match=match) as info:
        from_array_record(record)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("data, match", [(_npy_header("<f4", (1 << 40,)), "header declares"), (_npy_header("|O", (1,), b"\0" * 8), "not a plain numeric")])
def test_a_packed_inner_header_is_checked_before_allocation(data, match):
    tracemalloc.start()
    try:
        with pytest.raises(TensorError, match=match) as info:
            from_array_record(_packed(f'[["w", {len(data)}]]'.encode(), data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "'w'" in str(info.value) and peak < 1 << 20


def test_a_packed_record_is_alone_uint8_and_within_budget():
    record = to_array_record({"a": np.ones(100, np.float32), "b": np.ones(100, np.float32)})
    with pytest.raises(TensorError, match="'b'.*over 799 bytes"):
        from_array_record(record, max_bytes=799)
    record["other"] = Array(np.ones(2, np.float32))
    with pytest.raises(TensorError, match="beside 1 other arrays"):
        from_array_record(record)
    wrong = ArrayRecord(array_dict={PACKED_KEY: Array(np.ones(4, np.float32))})
    with pytest.raises(TensorError, match="expected 1-D uint8"):
        from_array_record(wrong)
    assert MAX_INDEX_BYTES >= 1 << 20
