"""Named numpy arrays <-> Flower ArrayRecord, the container every update travels in.

Round trips are exact: names keep their order, and every array keeps its dtype, shape (0-d
included) and bytes. Only plain numeric/bool numpy arrays are accepted, since Flower
serialises with ``np.save`` without pickling.

Reading never trusts the bytes: ``Array.numpy()`` would ``np.load`` whatever a peer sent (an
empty buffer, a zip, a header claiming 2^40 elements). Here the ``.npy`` header is parsed with
numpy's public ``np.lib.format`` readers, the dtype must be plain numeric, the declared size
must equal the bytes present, and the sum over the record must fit ``max_bytes``, all before
any array is created. Every failure is a one-line ``TensorError`` naming the array.

On the wire a record is packed (``to_array_record``): all its arrays travel as one Flower
``Array`` named PACKED_KEY, a uint8 buffer of an 8-byte little-endian index length, a JSON
index ``[[name, length], ...]`` and the arrays' ``.npy`` buffers back to back, in order.
Flower moves every Array (and every chunk of one) as an object of its own, one request each
between the SuperLink and a SuperNode: a LoRA update of 16-200 arrays is then 2-3 objects
instead of 35-400, and a networked round waits on a handful of requests instead of hundreds.
``from_array_record`` reads packed and plain records alike; a packed one's index is checked
(bounded, well-formed, unique names, lengths that add up to exactly the bytes present) before
each inner ``.npy`` header is checked as a plain array's would be.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY
MAX_HEADER_BYTES = 10_000  # numpy's own default cap on an .npy header
MAX_NDIM = 32  # numpy supports 64; no LoRA or codec array comes close
PACKED_KEY = "fedsite.packed"  # the one Array of a packed record
MAX_INDEX_BYTES = 8 << 20  # a packed record's JSON index (names and lengths): far above any adapter's
_INDEX_LENGTH = struct.Struct("<Q")


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


def to_array_record(named: Mapping[str, np.ndarray], packed: bool = True) -> ArrayRecord:
    """Named arrays as an ArrayRecord, in the mapping's order: packed into one Array (the wire
    form, see the module's doc), or with `packed=False` one Array per name."""
    plain = {name: Array(_as_plain_array(name, value)) for name, value in named.items()}
    if not packed or not plain:  # nothing to pack: an empty record stays empty
        return ArrayRecord(array_dict=plain)
    buffers = [array.data for array in plain.values()]
    index = json.dumps([[name, len(data)] for name, data in zip(plain, buffers)], separators=(",", ":")).encode()
    blob = b"".join([_INDEX_LENGTH.pack(len(index)), index, *buffers])
    return ArrayRecord(array_dict={PACKED_KEY: Array(np.frombuffer(blob, dtype=np.uint8))})


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def array_layout(name: str, array: object) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) of a Flower `Array`, from its .npy header alone.

    Nothing is allocated beyond the header; raises TensorError unless the array is a plain
    numeric one whose declared size is exactly the bytes it carries.
    """
    return npy_layout(name, _array_bytes(name, array))


def _array_bytes(name: str, array: object) -> bytes:
    if not isinstance(array, Array):
        raise TensorError(f"array {name!r}: a {type(array).__name__}, expected a Flower Array")
    if getattr(array, "stype", None) != NUMPY_STYPE:
        raise TensorError(f"array {name!r}: serialization {_short(getattr(array, 'stype', None))}, expected {NUMPY_STYPE!r}")
    data = getattr(array, "data", None)
    if not isinstance(data, bytes):
        raise TensorError(f"array {name!r}: data is a {type(data).__name__}, expected bytes")
    return data


def npy_layout(name: str, data: bytes, start: int = 0, end: int | None = None) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset in `data`) of the .npy buffer `data[start:end]`,
    from its header alone; the same checks as `array_layout`."""
    end = len(data) if end is None else end
    stream = io.BytesIO(data)
    stream.seek(start)
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
    if offset > end or size != end - offset:
        raise TensorError(f"array {name!r}: header declares {size} bytes ({dtype} {list(shape)}) but {end - offset} follow")
    return dtype, shape, bool(fortran), offset


def _packed_index(data: bytes, base: int = 0) -> list[tuple[str, int, int]]:
    """(name, start, end) in `data` of each array of the packed record held in `data[base:]`
    (positions in `data` itself, so the packed bytes are never copied); raises TensorError."""
    present = len(data) - base
    if present < _INDEX_LENGTH.size:
        raise TensorError(f"packed arrays: {present} bytes, too short for the index length")
    (length,) = _INDEX_LENGTH.unpack_from(data, base)
    if length > min(MAX_INDEX_BYTES, present - _INDEX_LENGTH.size):
        raise TensorError(f"packed arrays: index of {length} bytes (at most {MAX_INDEX_BYTES}, and {present - _INDEX_LENGTH.size} present)")
    first = base + _INDEX_LENGTH.size
    try:
        index = json.loads(data[first : first + length])
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise TensorError(f"packed arrays: the index is not JSON ({type(err).__name__})") from None
    if not isinstance(index, list):
        raise TensorError(f"packed arrays: the index is a {type(index).__name__}, expected a list")
    spans, seen, at = [], set(), first + length
    for entry in index:
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and entry[0] and type(entry[1]) is int and entry[1] >= 0
        if not ok:
            raise TensorError(f"packed arrays: index entry {_short(entry)} is not [name, length]")
        name, size = entry
        if name in seen:
            raise TensorError(f"packed arrays: array {name!r} appears twice")
        seen.add(name)
        spans.append((name, at, at + size))
        at += size
    if at != len(data):
        raise TensorError(f"packed arrays: the index accounts for {at - base} bytes but {present} are present")
    return spans


def from_array_record(record: ArrayRecord, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into named numpy arrays, in the record's order.

    Every header is checked first and the declared sizes summed against `max_bytes` (None: no
    budget); only then are the arrays created, never by unpickling. Raises TensorError.
    """
    if not isinstance(record, ArrayRecord):
        raise TensorError(f"arrays: a {type(record).__name__}, expected an ArrayRecord")
    if PACKED_KEY in record.keys():
        if len(record) != 1:
            raise TensorError(f"packed arrays: {PACKED_KEY!r} beside {len(record) - 1} other arrays")
        packed = record[PACKED_KEY]
        dtype, shape, _, offset = array_layout(PACKED_KEY, packed)
        if dtype != np.uint8 or len(shape) != 1:
            raise TensorError(f"packed arrays: {dtype} {list(shape)}, expected 1-D uint8")
        spans = [(name, packed.data, start, end) for name, start, end in _packed_index(packed.data, offset)]
    else:
        spans = []
        for name, array in record.items():
            if not isinstance(name, str) or not name:
                raise TensorError(f"array name {_short(name)} is not a non-empty str")
            data = _array_bytes(name, array)
            spans.append((name, data, 0, len(data)))
    layouts: dict[str, tuple[bytes, np.dtype, tuple[int, ...], bool, int]] = {}
    total = 0
    for name, data, start, end in spans:
        dtype, shape, fortran, offset = npy_layout(name, data, start, end)
        total += math.prod(shape) * dtype.itemsize
        if max_bytes is not None and total > max_bytes:
            raise TensorError(f"array {name!r}: the record declares over {max_bytes} bytes of arrays (budget of this record)")
        layouts[name] = (data, dtype, shape, fortran, offset)
    out: dict[str, np.ndarray] = {}
    for name, (data, dtype, shape, fortran, offset) in layouts.items():
        flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
        # as np.load does for Fortran order; the copy owns its memory and is writable
        value = flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)
        out[name] = np.array(value, order="C", copy=True)
    return out


def nbytes(named: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of the arrays themselves (what metrics count), without names or headers."""
    return int(sum(np.asarray(value).nbytes for value in named.values()))
