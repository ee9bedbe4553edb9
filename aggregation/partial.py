"""Aggregation over partial module sets (Kill-and-Revive): each client sends only the modules it trained.

`partial_mean` is FedAvg per key over the clients that sent that key, weighted by their
weights, and leaves every key nobody sent exactly as it was. `merge` puts a rule's output on
a subset of keys back into the full global arrays, so any rule (FFA-LoRA, RoLoRA, a server
optimizer) can run on the selected modules alone: `merge(current, rule(subset(current), ...))`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregation.fedavg import normalized_weights

NamedArrays = Mapping[str, np.ndarray]


def partial_mean(current: NamedArrays, updates: Sequence[NamedArrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """sum_{i sent k} w_i u_i[k] / sum_{i sent k} w_i for every key some update carries; `current[k]`
    (copied) for the others. Keys outside `current` are an error: validate the updates first."""
    normalized_weights(weights, len(updates), who="partial_mean")
    unknown = sorted({k for u in updates for k in u} - set(current))
    if unknown:
        raise ValueError(f"partial_mean: key {unknown[0]!r} is not in the global arrays")
    out: dict[str, np.ndarray] = {}
    for key, base in current.items():
        senders = [(u[key], float(w)) for u, w in zip(updates, weights) if key in u and w > 0]
        if not senders:
            out[key] = np.array(base, copy=True)
            continue
        total = sum(w for _, w in senders)
        acc = np.zeros(np.shape(base), dtype=np.float64)
        for value, weight in senders:
            acc += np.asarray(value, dtype=np.float64) * (weight / total)
        out[key] = acc.astype(np.asarray(base).dtype)
    return out


def under(arrays: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays whose keys start with `prefix`, the prefix removed (a checkpoint's `opt/...`)."""
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def subset(arrays: NamedArrays, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """`arrays` cut to `keys` (in that order)."""
    return {k: arrays[k] for k in keys}


def merge(current: NamedArrays, updated: NamedArrays) -> dict[str, np.ndarray]:
    """`current` with the keys of `updated` replaced (in `current`'s order and dtypes)."""
    unknown = sorted(set(updated) - set(current))
    if unknown:
        raise ValueError(f"merge: key {unknown[0]!r} is not in the global arrays")
    return {k: (np.asarray(updated[k]).astype(np.asarray(v).dtype) if k in updated else np.array(v, copy=True)) for k, v in current.items()}
