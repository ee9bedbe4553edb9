"""Update validation: is a client's update safe to aggregate with the current global arrays?

A federated round must survive any single bad client (bug, stale version, attacker): every
update is checked against a reference (the current global arrays) before it can reach an
aggregation rule, and a bad one is rejected with a one-line reason naming the key and what
was wrong. Rules themselves then assume well-formed input and stay simple.

Checks, in order: unknown key, missing key, per-key array type / shape / dtype / finiteness,
total size in bytes (`max_bytes`), global L2 norm (`max_norm`; a norm bound is the standard
cheap defence against scaled "model replacement" updates, Bagdasaryan et al. 2020, and what
DP-FedAvg clips to, McMahan et al. 2018).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

NamedArrays = Mapping[str, np.ndarray]


def global_l2_norm(arrays: NamedArrays, reference: NamedArrays | None = None) -> float:
    """sqrt(sum over keys of ||a_k - ref_k||^2), the L2 norm of all arrays seen as one vector.

    With `reference`, the norm of the difference (a client's delta from the global arrays).
    Accumulates in float64 so fp16 arrays do not overflow.
    """
    return float(np.sqrt(sum(_sq_norms(arrays, reference).values(), 0.0)))


def _sq_norms(arrays: NamedArrays, reference: NamedArrays | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in arrays.items():
        v = np.asarray(value, dtype=np.float64)
        if reference is not None:
            v = v - np.asarray(reference[key], dtype=np.float64)
        out[key] = float(np.vdot(v, v))
    return out


def _first(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else f"{keys[0]} (and {len(keys) - 1} more)"


def validate_update(
    update: NamedArrays,
    reference: NamedArrays,
    *,
    max_norm: float | None = None,
    max_bytes: int | None = None,
    relative: bool = False,
) -> str | None:
    """Return None if `update` can be aggregated with `reference`, else a one-line reason.

    The update must carry exactly the reference's keys, each a numpy array of the same
    shape and dtype, all finite. `max_bytes` bounds the summed `nbytes` of the update;
    `max_norm` bounds its global L2 norm -- of the update as sent, or with `relative=True`
    of `update - reference` (use that when clients send trained weights, not deltas, and
    `reference` is the current global). Never raises on a bad update.
    """
    if not isinstance(update, Mapping):
        return f"update is a {type(update).__name__}, expected a mapping of name -> array"
    unknown = sorted(set(update) - set(reference), key=str)
    if unknown:
        return f"unknown key {_first([str(k) for k in unknown])}"
    missing = sorted(set(reference) - set(update))
    if missing:
        return f"missing key {_first(missing)}"
    for key, ref in reference.items():
        value = update[key]
        if not isinstance(value, np.ndarray):
            return f"{key}: got {type(value).__name__}, expected a numpy array"
        if value.shape != ref.shape:
            return f"{key}: shape {value.shape}, expected {ref.shape}"
        if value.dtype != ref.dtype:
            return f"{key}: dtype {value.dtype}, expected {ref.dtype}"
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            return f"{key}: contains NaN or Inf ({bad} of {value.size} values)"
    if max_bytes is not None:
        sizes = {key: int(update[key].nbytes) for key in reference}
        total = sum(sizes.values())
        if total > max_bytes:
            largest = max(sizes, key=sizes.__getitem__)
            return f"size {total} bytes exceeds limit {max_bytes} (largest key {largest}: {sizes[largest]} bytes)"
    if max_norm is not None:
        sq = _sq_norms(update, reference if relative else None)
        norm = float(np.sqrt(sum(sq.values(), 0.0)))
        if not norm <= max_norm:
            largest = max(sq, key=sq.__getitem__)
            what = "delta L2 norm" if relative else "global L2 norm"
            return (
                f"{what} {norm:.6g} exceeds bound {max_norm:.6g} "
                f"(largest key {largest}: norm {np.sqrt(sq[largest]):.6g})"
            )
    return None


def partition_valid(
    updates: Sequence[tuple[str, NamedArrays]],
    reference: NamedArrays,
    **bounds,
) -> tuple[list[tuple[str, NamedArrays]], list[tuple[str, str]]]:
    """Split (client id, update) pairs into (accepted, [(client id, reason), ...]).

    `bounds` are passed to `validate_update` (max_norm, max_bytes, relative). Order is kept,
    so accepted[i] and the caller's weights can be matched by client id.
    """
    accepted: list[tuple[str, NamedArrays]] = []
    rejected: list[tuple[str, str]] = []
    for client, update in updates:
        reason = validate_update(update, reference, **bounds)
        if reason is None:
            accepted.append((client, update))
        else:
            rejected.append((client, reason))
    return accepted, rejected
