"""LoRA-aware aggregation: average so that the merged ΔW = s·B@A is what the clients meant.

A LoRA module trains ΔW = s·B@A (A: r x in, B: out x r, s = alpha/r). Plain FedAvg of A and
of B gives mean(B)@mean(A), which is not the mean of the clients' products mean(B_i@A_i):
mean(B_i@A_i) - mean(B)@mean(A) = sum_i w_i (B_i - mean B)(A_i - mean A), the weighted
cross-covariance of the factors (`fedavg_product_gap`). The rules here remove it:

- FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning"):
  A stays frozen at its shared init, only B trains, so mean(B_i)@A is exact.
- FedEx-LoRA (Singhal et al. 2024, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
  Fine-Tuning of Foundation Models"): average A and B as FedAvg does, and return the residual
  mean(B_i@A_i) - mean(B)@mean(A), which the coordinator folds into the frozen base weight.
- RoLoRA (Chen et al. 2024, "Robust Federated Finetuning of LLMs via Alternating
  Optimization of LoRA"): alternate rounds train only A or only B; with the other factor
  shared the mean is exact again.

Keys follow PEFT's state dict: `X.lora_A.weight` pairs with `X.lora_B.weight` (also
`X.lora_A.<adapter>.weight`). Other keys (biases, modules_to_save, lora_embedding_*) are
averaged with plain FedAvg by every rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

from aggregation.fedavg import normalized_weights, weighted_mean

NamedArrays = Mapping[str, np.ndarray]

_A_KEY = re.compile(r"^(?P<prefix>.+)\.lora_A(?P<adapter>\.[^.]+)?\.weight$")
_B_KEY = re.compile(r"^(?P<prefix>.+)\.lora_B(?P<adapter>\.[^.]+)?\.weight$")


def pair_keys(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Map each LoRA module prefix to its (lora_A key, lora_B key).

    The prefix is the key without `.lora_A` and the final `.weight`
    (`...q_proj.lora_A.weight` -> `...q_proj`). Raises ValueError naming an A without its B
    or a B without its A; keys that are neither are ignored.
    """
    keys = list(keys)
    key_set = set(keys)
    pairs: dict[str, tuple[str, str]] = {}
    for key in keys:
        m = _A_KEY.match(key)
        if m is None:
            continue
        adapter = m["adapter"] or ""
        b_key = f"{m['prefix']}.lora_B{adapter}.weight"
        if b_key not in key_set:
            raise ValueError(f"LoRA key {key} has no matching {b_key}")
        pairs[m["prefix"] + adapter] = (key, b_key)
    paired_b = {b for _, b in pairs.values()}
    for key in keys:
        if _B_KEY.match(key) and key not in paired_b:
            raise ValueError(f"LoRA key {key} has no matching lora_A key")
    return pairs


def factor_keys(keys: Iterable[str], which: Literal["A", "B"]) -> list[str]:
    """The lora_A (which="A") or lora_B (which="B") keys among `keys`, in pair order."""
    if which not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {which!r}")
    return [pair[0 if which == "A" else 1] for pair in pair_keys(keys).values()]


def get_factors(update: NamedArrays, a_key: str, b_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of one module, checked to be 2-D with B's columns == A's rows (the rank)."""
    a, b = np.asarray(update[a_key]), np.asarray(update[b_key])
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"{b_key} {b.shape} @ {a_key} {a.shape}: expected B (out x r) and A (r x in)")
    return a, b


def product(update: NamedArrays, scaling: float = 1.0) -> dict[str, np.ndarray]:
    """{prefix: scaling * B @ A} in float64: each module's ΔW (PEFT's scaling is alpha/r)."""
    out = {}
    for prefix, (a_key, b_key) in pair_keys(update).items():
        a, b = get_factors(update, a_key, b_key)
        out[prefix] = scaling * (b.astype(np.float64) @ a.astype(np.float64))
    return out


def mean_product(updates: Sequence[NamedArrays], weights: Sequence[float], scaling: float = 1.0) -> dict[str, np.ndarray]:
    """{prefix: sum_i w_i * scaling * B_i @ A_i} with normalised weights: the exact target."""
    w = normalized_weights(weights, len(updates), who="mean_product")
    out: dict[str, np.ndarray] = {}
    for wi, update in zip(w, updates):
        for prefix, delta in product(update, scaling).items():
            out[prefix] = out[prefix] + wi * delta if prefix in out else wi * delta
    return out


def _mean_except(updates: Sequence[NamedArrays], weights: Sequence[float], skip: set[str]) -> dict[str, np.ndarray]:
    keep = [k for k in updates[0] if k not in skip]
    if not keep:
        normalized_weights(weights, len(updates), who="aggregation")
        return {}
    return weighted_mean([{k: u[k] for k in keep} for u in updates], weights)


def ffa_lora(updates: Sequence[NamedArrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """FFA-LoRA: average B (and non-LoRA keys), keep the shared frozen A.

    A is frozen at a common init, so mean(B_i) @ A == mean(B_i @ A) exactly, and the rule
    needs only a weighted sum (secure-aggregation compatible). Raises ValueError naming the
    key and client index if some client's A differs from client 0's.
    """
    normalized_weights(weights, len(updates), who="ffa_lora")
    a_keys = factor_keys(updates[0], "A")
    for i, update in enumerate(updates[1:], start=1):
        for a_key in a_keys:
            if a_key not in update or not np.array_equal(update[a_key], updates[0][a_key]):
                raise ValueError(f"ffa_lora: {a_key} of client {i} differs from client 0's; FFA-LoRA needs a frozen shared A")
    out = _mean_except(updates, weights, set(a_keys))
    out.update({k: np.array(updates[0][k], copy=True) for k in a_keys})
    return {k: out[k] for k in updates[0]}


def fedex_lora(
    updates: Sequence[NamedArrays], weights: Sequence[float], scaling: float = 1.0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """FedEx-LoRA: (FedAvg of all factors, {prefix: residual}) with the residual exact.

    residual = scaling * (sum_i w_i B_i@A_i - mean(B)@mean(A)), float64, computed against
    the returned (dtype-cast) factors, so scaling*B@A of the new factors + residual equals the
    weighted mean of the clients' ΔW up to float64 rounding. The coordinator adds the
    residual to the frozen base weight of each prefix (or keeps it as a dense delta).
    Needs the individual products: not secure-aggregation compatible.
    """
    factors = weighted_mean(updates, weights)
    target = mean_product(updates, weights, scaling)
    merged = product(factors, scaling)
    return factors, {prefix: target[prefix] - merged[prefix] for prefix in target}


def rolora_trainable(round: int) -> Literal["A", "B"]:
    """Which factor clients train in 1-based `round`: odd rounds "B", even rounds "A".

    B starts first because LoRA initialises B to zero: with B = 0 the gradient of A is zero,
    so a first round that trains only A would change nothing.
    """
    if round < 1:
        raise ValueError(f"rolora: round must be >= 1 (Flower counts from 1), got {round}")
    return "B" if round % 2 == 1 else "A"


def rolora(
    updates: Sequence[NamedArrays], weights: Sequence[float], round: int, current: NamedArrays
) -> dict[str, np.ndarray]:
    """RoLoRA: average only the factor trained this round, keep the other from `current`.

    With the frozen factor shared by all clients, the mean of products is exact. Clients may
    omit the frozen factor's keys (it saves upload); any copies they send are ignored.
    Non-LoRA keys are averaged every round.
    """
    trained = rolora_trainable(round)
    frozen = set(factor_keys(current, "B" if trained == "A" else "A"))
    out = _mean_except(updates, weights, frozen)
    out.update({k: np.array(current[k], copy=True) for k in frozen})
    missing = sorted(set(current) - set(out))
    if missing:
        raise ValueError(f"rolora: key {missing[0]} missing from the updates")
    return {k: out[k] for k in current}


def fedavg_product_gap(updates: Sequence[NamedArrays], weights: Sequence[float], scaling: float = 1.0) -> float:
    """Frobenius norm, over all modules, of mean(B)@mean(A) - mean(B_i@A_i).

    This is the error plain FedAvg of the factors makes: it equals
    ||sum_i w_i (B_i - mean B)(A_i - mean A)||, non-zero as soon as clients' A's and B's
    both differ (any two clients training both factors from different data).
    """
    target = mean_product(updates, weights, scaling)
    as64 = [{k: np.asarray(v, dtype=np.float64) for k, v in u.items()} for u in updates]
    merged = product(weighted_mean(as64, weights), scaling)
    return float(np.sqrt(sum(float(np.sum((merged[p] - target[p]) ** 2)) for p in target)))
