"""Bounds against capture: example caps, weight-share caps, the round-relative norm bound."""

import numpy as np
import pytest

from aggregation.bounds import cap_examples, cap_weight_share, median, norm_reference, relative_norm_bound


def test_examples_are_capped_by_the_run_and_by_each_clients_limit():
    assert cap_examples([10, 1e12, 50], 100) == [10.0, 100.0, 50.0]
    assert cap_examples([10, 1e12, 50], 0) == [10.0, 1e12, 50.0]  # 0: no run cap
    assert cap_examples([10, 1e12, 50], 100, [None, 20, 30]) == [10.0, 20.0, 30.0]
    with pytest.raises(ValueError, match="2 counts but 1 limits"):
        cap_examples([1, 2], 10, [None])


@pytest.mark.parametrize("seed", range(20))
def test_weight_share_cap_holds_keeps_the_total_and_the_order(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 12))
    weights = list(rng.lognormal(0, 3, n))
    cap = float(rng.uniform(1 / n + 0.01, 0.9))
    out = cap_weight_share(weights, cap)
    total = sum(weights)
    assert sum(out) == pytest.approx(total)
    assert max(out) / sum(out) <= cap + 1e-9
    order = np.argsort(weights, kind="stable")
    assert all(out[i] <= out[j] + 1e-9 * total for i, j in zip(order, order[1:]))  # heavier never becomes lighter
    # weights under the cap keep their ratios among themselves
    free = [i for i in range(n) if out[i] / sum(out) < cap - 1e-9]
    if len(free) >= 2:
        ratios = [out[i] / weights[i] for i in free]
        assert max(ratios) == pytest.approx(min(ratios))


def test_weight_share_cap_examples():
    assert cap_weight_share([1, 1, 1000], 0.5) == pytest.approx([250.5, 250.5, 501.0])
    assert cap_weight_share([1, 1e12], 0.5) == pytest.approx([(1 + 1e12) / 2] * 2)  # infeasible below 1/n: equal
    assert cap_weight_share([1, 3], 0.0) == [1.0, 3.0] and cap_weight_share([1, 3], 1.0) == [1.0, 3.0]  # off
    assert cap_weight_share([], 0.5) == []
    with pytest.raises(ValueError, match="finite, non-negative"):
        cap_weight_share([1.0, float("nan")], 0.5)
    with pytest.raises(ValueError, match="not all zero"):
        cap_weight_share([0.0, 0.0], 0.5)


def test_norm_reference_is_the_median_the_smaller_of_two_or_the_previous_rounds():
    assert median([3.0, 1.0, 2.0, 100.0]) == 2.5
    assert norm_reference([1.0, 2.0, 1e9]) == 2.0  # one outlier cannot move a median of three
    assert norm_reference([1.0, 1e9]) == 1.0  # of two, the outlier cannot raise the bar for itself
    assert norm_reference([1e-30, 1.0], previous=0.8) == 0.8 and norm_reference([1.0, 1e9], previous=0.8) == 1.0  # nor lower it
    assert norm_reference([5.0], previous=2.0) == 2.0 and norm_reference([5.0]) is None
    assert norm_reference([float("inf"), 1.0, 2.0]) == 1.0  # non-finite norms never set the bar
    assert relative_norm_bound([1.0, 1e9], 5.0) == (5.0, 1.0)
    assert relative_norm_bound([3.0], 5.0) == (None, None)
    with pytest.raises(ValueError, match=">= 1"):
        relative_norm_bound([1.0, 2.0], 0.5)
