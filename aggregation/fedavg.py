"""Federated averaging: the example-weighted mean of named arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

NamedArrays = Mapping[str, np.ndarray]


def weighted_mean(updates: Sequence[NamedArrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Return sum_i w_i * u_i / sum_i w_i for every key (FedAvg, McMahan et al. 2017).

    All updates must carry the same keys and shapes: validate them first
    (`aggregation.validate`). Accumulates in float64 so the mean of many clients
    does not drift, and returns each array in its input dtype.
    """
    if not updates:
        raise ValueError("weighted_mean: no updates to aggregate")
    if len(updates) != len(weights):
        raise ValueError(f"weighted_mean: {len(updates)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weighted_mean: weights must sum to a positive number, got {total}")
    out: dict[str, np.ndarray] = {}
    for key, first in updates[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for update, weight in zip(updates, weights):
            acc += np.asarray(update[key], dtype=np.float64) * (weight / total)
        out[key] = acc.astype(first.dtype)
    return out


def normalized_weights(weights: Sequence[float], count: int, *, who: str = "weights") -> np.ndarray:
    """Return `weights / sum(weights)` as float64, checking there is one non-negative weight per update.

    Shared by the rules that need the normalised weights themselves (FLoRA scales each
    client's B by its weight), so every rule rejects bad weights with the same message.
    """
    if count == 0:
        raise ValueError(f"{who}: no updates to aggregate")
    if len(weights) != count:
        raise ValueError(f"{who}: {count} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{who}: weights must be finite and non-negative, got {list(weights)}")
    total = float(w.sum())
    if not total > 0:
        raise ValueError(f"{who}: weights must sum to a positive number, got {total}")
    return w / total
