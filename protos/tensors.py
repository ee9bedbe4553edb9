"""Named numpy arrays <-> Flower ArrayRecord, the container every update travels in.

Round trips are exact: names keep their order, and every array keeps its dtype, shape (0-d
included) and bytes. Only plain numeric/bool numpy arrays are accepted, since Flower
serialises with ``np.save`` without pickling.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


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


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into named numpy arrays, in the record's order."""
    return {name: array.numpy() for name, array in record.items()}


def nbytes(named: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of the arrays themselves (what metrics count), without names or headers."""
    return int(sum(np.asarray(value).nbytes for value in named.values()))
