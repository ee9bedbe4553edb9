"""Heterogeneous LoRA ranks: clients on weaker devices train smaller ranks of the same modules.

Rank is read from shapes (A: r x in, B: out x r), never from configuration.

- HetLoRA (Cho et al. 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
  Foundation Models"): zero-pad every client's factors to the largest rank (rows of A,
  columns of B; padding leaves B@A unchanged), average, and send each client the first r_i
  rows/columns back (`truncate_to_rank`). The paper's optional sparsity weighting and rank
  self-pruning are left to the coordinator. Like FedAvg of factors it is not exact, and the
  padded tail of rank directions is diluted by clients that lack it.
- FLoRA (Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
  Heterogeneous Low-Rank Adaptations"): stack instead of averaging. With A = [A_1; ...; A_n]
  (rows) and B = [w_1 B_1, ..., w_n B_n] (columns), B@A = sum_i w_i B_i@A_i exactly, at rank
  sum_i r_i. The coordinator merges that product into the base weight and clients start
  fresh adapters next round (the stacked adapter is too wide to send back).

Scaling: PEFT multiplies by alpha/r, so padding or truncating preserves ΔW only if alpha/r is
the same for all ranks (configure alpha proportional to r); FLoRA takes per-client scalings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from aggregation.fedavg import normalized_weights, weighted_mean
from aggregation.lora import get_factors, pair_keys

NamedArrays = Mapping[str, np.ndarray]


def ranks(update: NamedArrays) -> dict[str, int]:
    """{prefix: r} for every LoRA module of `update`, read from the shapes of A and B."""
    return {prefix: get_factors(update, a, b)[0].shape[0] for prefix, (a, b) in pair_keys(update).items()}


def pad_to_rank(update: NamedArrays, rank: int) -> dict[str, np.ndarray]:
    """Zero-pad every A to `rank` rows and every B to `rank` columns; B@A is unchanged.

    Non-LoRA keys are copied. Raises ValueError naming the key whose rank exceeds `rank`.
    """
    out = {k: np.array(v, copy=True) for k, v in update.items()}
    for a_key, b_key in pair_keys(update).values():
        a, b = get_factors(update, a_key, b_key)
        r = a.shape[0]
        if r > rank:
            raise ValueError(f"pad_to_rank: {a_key} has rank {r}, above the target rank {rank}")
        out[a_key] = np.concatenate([a, np.zeros((rank - r, a.shape[1]), dtype=a.dtype)], axis=0)
        out[b_key] = np.concatenate([b, np.zeros((b.shape[0], rank - r), dtype=b.dtype)], axis=1)
    return out


def truncate_to_rank(update: NamedArrays, rank: int) -> dict[str, np.ndarray]:
    """Keep the first `rank` rows of every A and columns of every B (HetLoRA's send-back).

    Non-LoRA keys are copied. Raises ValueError naming the key whose rank is below `rank`.
    """
    out = {k: np.array(v, copy=True) for k, v in update.items()}
    for a_key, b_key in pair_keys(update).values():
        a, b = get_factors(update, a_key, b_key)
        if a.shape[0] < rank:
            raise ValueError(f"truncate_to_rank: {a_key} has rank {a.shape[0]}, below the target rank {rank}")
        out[a_key] = np.array(a[:rank], copy=True)
        out[b_key] = np.array(b[:, :rank], copy=True)
    return out


def hetlora(updates: Sequence[NamedArrays], weights: Sequence[float], max_rank: int | None = None) -> dict[str, np.ndarray]:
    """HetLoRA: zero-pad every update to `max_rank` (default: the largest rank seen), then FedAvg.

    Returns the global adapter at `max_rank`; give client i `truncate_to_rank(global, r_i)`.
    """
    normalized_weights(weights, len(updates), who="hetlora")
    if max_rank is None:
        max_rank = max((r for u in updates for r in ranks(u).values()), default=0)
    return weighted_mean([pad_to_rank(u, max_rank) for u in updates], weights)


def flora_stack(
    updates: Sequence[NamedArrays],
    weights: Sequence[float],
    *,
    scalings: Sequence[float] | None = None,
    out_scaling: float = 1.0,
) -> dict[str, np.ndarray]:
    """FLoRA: stack A's along rank (rows) and weighted B's along columns, in client order.

    B_i is multiplied by w_i * s_i / out_scaling (w normalised, s_i = scalings[i], default 1),
    so out_scaling * B_stack @ A_stack == sum_i w_i s_i B_i @ A_i exactly (up to the dtype's
    rounding). Non-LoRA keys are averaged. Every client must carry the same module prefixes
    and in/out shapes; ranks may differ.
    """
    w = normalized_weights(weights, len(updates), who="flora_stack")
    s = np.ones(len(updates)) if scalings is None else np.asarray(scalings, dtype=np.float64)
    if s.shape != (len(updates),):
        raise ValueError(f"flora_stack: {len(updates)} updates but {s.size} scalings")
    pairs = pair_keys(updates[0])
    lora_keys = {k for pair in pairs.values() for k in pair}
    rest = [k for k in updates[0] if k not in lora_keys]
    out = weighted_mean([{k: u[k] for k in rest} for u in updates], weights) if rest else {}
    for i, update in enumerate(updates[1:], start=1):
        if pair_keys(update).keys() != pairs.keys():
            raise ValueError(f"flora_stack: client {i} has LoRA modules {sorted(pair_keys(update))[:3]}..., client 0 {sorted(pairs)[:3]}...")
    for a_key, b_key in pairs.values():
        factors = [get_factors(u, a_key, b_key) for u in updates]
        a0, b0 = factors[0]
        for i, (a, b) in enumerate(factors):
            if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
                raise ValueError(f"flora_stack: client {i} {a_key} {a.shape} / {b_key} {b.shape} do not match client 0's in/out sizes")
        out[a_key] = np.concatenate([a for a, _ in factors], axis=0)
        out[b_key] = np.concatenate(
            [(b.astype(np.float64) * (w[i] * s[i] / out_scaling)).astype(b0.dtype) for i, (_, b) in enumerate(factors)], axis=1
        )
    return {k: out[k] for k in updates[0]}
