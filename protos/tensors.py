"""Named numpy arrays <-> Flower ArrayRecord, the container every update travels in.

Round trips are exact: names keep their order, and every array keeps its dtype, shape (0-d
included) and bytes. Only plain numeric/bool numpy arrays are accepted, since Flower
serialises with ``np.save`` without pickling.

Reading never trusts the bytes: ``Array.numpy()`` would ``np.load`` whatever a peer sent (an
empty buffer, a zip, a header claiming 2^40 elements). Here the ``.npy`` header is parsed with
numpy's public ``np.lib.format`` readers, the dtype must be plain numeric, the declared size
must equal the bytes present, and the sum over the record must fit ``max_bytes``, all before
any array is created. Every failure is a one-line ``TensorError`` naming the array.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY
MAX_HEADER_BYTES = 10_000  # numpy's own default cap on an .npy header
MAX_NDIM = 32  # numpy supports 64; no LoRA or codec array comes close


class TensorError(ValueError):
    """An array in a record that cannot be read safely; one line, names the array."""


def _as_plain_array(name: object, value: object) -> np.ndarray:
    """C-contiguous view/copy of `value`; rejects what Flower could not carry exactly."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"array name must be a non-empty str, got {name!r}")
    # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
    array = np.asarray(value, order="C")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"array {name!r}: dtype {array.dtype} is not a numeric numpy dtype")
    return array


def to_array_record(named: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack named arrays into an ArrayRecord, in the mapping's order."""
    return ArrayRecord(array_dict={name: Array(_as_plain_array(name, value)) for name, value in named.items()})


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def array_layout(name: str, array: object) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) of a Flower `Array`, from its .npy header alone.

    Nothing is allocated beyond the header; raises TensorError unless the array is a plain
    numeric one whose declared size is exactly the bytes it carries.
    """
    if not isinstance(array, Array):
        raise TensorError(f"array {name!r}: a {type(array).__name__}, expected a Flower Array")
    if getattr(array, "stype", None) != NUMPY_STYPE:
        raise TensorError(f"array {name!r}: serialization {_short(getattr(array, 'stype', None))}, expected {NUMPY_STYPE!r}")
    data = getattr(array, "data", None)
    if not isinstance(data, bytes):
        raise TensorError(f"array {name!r}: data is a {type(data).__name__}, expected bytes")
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=MAX_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=MAX_HEADER_BYTES)
        else:
            raise ValueError(f"npy format version {version} is not supported")
    except Exception as err:  # numpy's header parser on hostile bytes: any failure is a bad header
        raise TensorError(f"array {name!r}: not a readable .npy buffer ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})") from None
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None or dtype.kind not in "biuf":
        raise TensorError(f"array {name!r}: dtype {dtype} is not a plain numeric dtype")
    if not isinstance(shape, tuple) or len(shape) > MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
        raise TensorError(f"array {name!r}: shape {_short(shape)} is not up to {MAX_NDIM} non-negative ints")
    offset = stream.tell()
    size = math.prod(shape) * dtype.itemsize
    if size != len(data) - offset:
        raise TensorError(f"array {name!r}: header declares {size} bytes ({dtype} {list(shape)}) but {len(data) - offset} follow")
    return dtype, shape, bool(fortran), offset


def from_array_record(record: ArrayRecord, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into named numpy arrays, in the record's order.

    Every header is checked first and the declared sizes summed against `max_bytes` (None: no
    budget); only then are the arrays created, never by unpickling. Raises TensorError.
    """
    if not isinstance(record, ArrayRecord):
        raise TensorError(f"arrays: a {type(record).__name__}, expected an ArrayRecord")
    layouts: dict[str, tuple[Array, np.dtype, tuple[int, ...], bool, int]] = {}
    total = 0
    for name, array in record.items():
        if not isinstance(name, str) or not name:
            raise TensorError(f"array name {_short(name)} is not a non-empty str")
        dtype, shape, fortran, offset = array_layout(name, array)
        total += math.prod(shape) * dtype.itemsize
        if max_bytes is not None and total > max_bytes:
            raise TensorError(f"array {name!r}: the record declares over {max_bytes} bytes of arrays (budget of this record)")
        layouts[name] = (array, dtype, shape, fortran, offset)
    out: dict[str, np.ndarray] = {}
    for name, (array, dtype, shape, fortran, offset) in layouts.items():
        flat = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=offset)
        # as np.load does for Fortran order; the copy owns its memory and is writable
        value = flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)
        out[name] = np.array(value, order="C", copy=True)
    return out


def nbytes(named: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of the arrays themselves (what metrics count), without names or headers."""
    return int(sum(np.asarray(value).nbytes for value in named.values()))
