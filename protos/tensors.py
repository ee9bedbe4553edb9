"""Named numpy arrays <-> Flower ArrayRecord, the container every update travels in."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(named: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={name: Array(np.ascontiguousarray(value)) for name, value in named.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def nbytes(named: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in named.values()))
