"""Bounds that keep one client from capturing the aggregate: example caps, weight-share caps,
and a norm bound relative to the round's own updates.

All pure functions on numbers; the coordinator applies them after every update was decoded and
validated (`aggregation.validate`), before the rule sees the weights.

- `cap_examples`: a reported example count is capped (a client claiming 10^12 examples would
  otherwise set the FedAvg result to its own update).
- `cap_weight_share`: no weight may exceed `max_share` of the total; the excess goes to the
  others in proportion to their weights (water-filling), so the order among them is kept.
- `norm_reference` / `relative_norm_bound`: an update whose delta norm exceeds `multiple` times
  the round's reference norm is an outlier (a scaled "model replacement" update, Bagdasaryan et
  al. 2020). The reference is the median of the round's norms with 3 or more updates. With 2,
  one client must not raise the bar for itself: it is the median of the two and the previous
  round's reference, or without one the smaller of the two (an honest client beside a huge
  update always passes; beside a zero update it may be refused: a lost update, not a captured
  aggregate). With 1 it is the previous round's reference when there is one, else there is
  nothing to compare with and no relative bound applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def cap_examples(counts: Sequence[float], cap: float, limits: Sequence[float | None] | None = None) -> list[float]:
    """Each count capped at `cap` (0 or less: no cap) and at its own limit (None: none)."""
    limits = list(limits) if limits is not None else [None] * len(counts)
    if len(limits) != len(counts):
        raise ValueError(f"cap_examples: {len(counts)} counts but {len(limits)} limits")
    out = []
    for count, limit in zip(counts, limits):
        value = float(count)
        if cap > 0:
            value = min(value, float(cap))
        if limit is not None:
            value = min(value, float(limit))
        out.append(value)
    return out


def cap_weight_share(weights: Sequence[float], max_share: float) -> list[float]:
    """`weights` rescaled so no one holds more than `max_share` of their sum; same total.

    `max_share` <= 0 or >= 1 changes nothing. When `max_share * len(weights) < 1` no split can
    honour it and every weight becomes equal (the most even split there is). Weights must be
    finite and non-negative with a positive sum.
    """
    w = [float(x) for x in weights]
    if not w:
        return []
    if not all(math.isfinite(x) and x >= 0 for x in w) or not sum(w) > 0:
        raise ValueError(f"cap_weight_share: weights must be finite, non-negative and not all zero, got {w}")
    if not 0 < max_share < 1:
        return w
    total, n = sum(w), len(w)
    if max_share * n <= 1:
        return [total / n] * n
    capped: set[int] = set()
    while True:
        free = [i for i in range(n) if i not in capped]
        budget = 1.0 - max_share * len(capped)  # share left for the uncapped weights
        free_sum = sum(w[i] for i in free)
        shares = {i: (w[i] / free_sum * budget if free_sum > 0 else budget / len(free)) for i in free}
        over = {i for i, s in shares.items() if s > max_share * (1 + 1e-12)}
        if not over:
            break
        capped |= over
    return [total * (max_share if i in capped else shares[i]) for i in range(n)]


def median(values: Sequence[float]) -> float:
    ordered = sorted(float(v) for v in values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def norm_reference(norms: Sequence[float], previous: float | None = None) -> float | None:
    """The norm a round's updates are compared with (see the module docstring); None: none."""
    finite = [float(v) for v in norms if math.isfinite(v)]
    if len(finite) >= 3:
        return median(finite)
    if len(finite) == 2:
        return median([*finite, previous]) if previous is not None else min(finite)
    return previous


def relative_norm_bound(norms: Sequence[float], multiple: float, previous: float | None = None) -> tuple[float | None, float | None]:
    """(bound, reference): updates with a norm above `bound` are outliers; None: no bound.

    `multiple` must be >= 1, so the reference update itself always passes.
    """
    if not multiple >= 1:
        raise ValueError(f"relative_norm_bound: multiple must be >= 1, got {multiple}")
    reference = norm_reference(norms, previous)
    return (None, None) if reference is None else (multiple * reference, reference)
