"""Byzantine-robust aggregation: a few arbitrary clients must not move the global model far.

- Coordinate-wise median and beta-trimmed mean (Yin et al. 2018, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates"): per coordinate, ignore the
  extremes, so one huge outlier changes nothing as long as a majority is honest. Both are
  unweighted, as in Flower's FedMedian / FedTrimmedAvg: an attacker could claim a large
  example count, so weights would hand it leverage.
- Norm clipping (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"): scale each
  client's delta from the global model down to a norm bound before averaging, so no one
  client's weight in the mean exceeds its share of the bound.

None of these can run under secure aggregation: they look at individual updates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregation.validate import global_l2_norm

NamedArrays = Mapping[str, np.ndarray]


def _stack(updates: Sequence[NamedArrays], key: str) -> np.ndarray:
    return np.stack([np.asarray(u[key], dtype=np.float64) for u in updates])


def coordinate_median(updates: Sequence[NamedArrays]) -> dict[str, np.ndarray]:
    """Per-coordinate median of the updates (mean of the two middle values for even n)."""
    if not updates:
        raise ValueError("coordinate_median: no updates to aggregate")
    return {key: np.median(_stack(updates, key), axis=0).astype(first.dtype) for key, first in updates[0].items()}


def trimmed_mean(updates: Sequence[NamedArrays], beta: float = 0.1) -> dict[str, np.ndarray]:
    """Per-coordinate mean after dropping the floor(beta*n) smallest and largest values.

    0 <= beta < 0.5 and at least one value must remain; beta=0 is the plain mean.
    """
    n = len(updates)
    if n == 0:
        raise ValueError("trimmed_mean: no updates to aggregate")
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
    k = int(np.floor(beta * n))
    out = {}
    for key, first in updates[0].items():
        values = np.sort(_stack(updates, key), axis=0)
        out[key] = values[k : n - k].mean(axis=0).astype(first.dtype)
    return out


def clip_updates(
    updates: Sequence[NamedArrays], reference: NamedArrays, max_norm: float
) -> list[dict[str, np.ndarray]]:
    """Return each update with its delta from `reference` scaled to global L2 norm <= max_norm.

    u' = ref + (u - ref) * min(1, max_norm / ||u - ref||), the norm taken over all keys
    together. Updates within the bound come back unchanged (copied); dtypes are kept.
    """
    if not max_norm > 0:
        raise ValueError(f"clip_updates: max_norm must be positive, got {max_norm}")
    out = []
    for update in updates:
        norm = global_l2_norm(update, reference)
        factor = 1.0 if norm <= max_norm else max_norm / norm
        clipped = {}
        for key, value in update.items():
            if factor == 1.0:
                clipped[key] = np.array(value, copy=True)
                continue
            ref = np.asarray(reference[key], dtype=np.float64)
            delta = np.asarray(value, dtype=np.float64) - ref
            clipped[key] = (ref + delta * factor).astype(np.asarray(value).dtype)
        out.append(clipped)
    return out
