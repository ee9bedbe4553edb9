import numpy as np
import pytest

from aggregation.fedavg import weighted_mean
from aggregation.lora import (
    factor_keys,
    fedavg_product_gap,
    fedex_lora,
    ffa_lora,
    mean_product,
    pair_keys,
    product,
    rolora,
    rolora_trainable,
)

from tests.aggregation.helpers import HEAD, Q, V, a_key, b_key, lora_update

WEIGHTS = [10, 30, 60]


def clients(seed=0, dtype=np.float32, n=3):
    rng = np.random.default_rng(seed)
    return [lora_update(rng, dtype=dtype) for _ in range(n)]


def target(updates, weights, scaling=1.0):
    """sum_i w_i s B_i A_i, computed directly in float64 as the reference."""
    w = np.asarray(weights, float) / sum(weights)
    return {p: sum(wi * scaling * (u[b_key(p)].astype(float) @ u[a_key(p)].astype(float)) for wi, u in zip(w, updates)) for p in (Q, V)}


def test_pair_keys_and_factor_keys():
    keys = [a_key(Q), b_key(Q), a_key(V), b_key(V), HEAD, "m.lora_A.default.weight", "m.lora_B.default.weight"]
    pairs = pair_keys(keys)
    assert pairs == {Q: (a_key(Q), b_key(Q)), V: (a_key(V), b_key(V)), "m.default": ("m.lora_A.default.weight", "m.lora_B.default.weight")}
    assert factor_keys(keys, "B") == [b_key(Q), b_key(V), "m.lora_B.default.weight"]


@pytest.mark.parametrize("keys", [[a_key(Q)], [b_key(Q)], [a_key(Q), b_key(V)]])
def test_pair_keys_rejects_unpaired(keys):
    with pytest.raises(ValueError, match="has no matching"):
        pair_keys(keys)


def test_product_is_scaled_b_at_a():
    u = clients()[0]
    prod = product(u, scaling=2.0)
    assert set(prod) == {Q, V}
    np.testing.assert_allclose(prod[Q], 2.0 * u[b_key(Q)].astype(float) @ u[a_key(Q)].astype(float), rtol=1e-12)
    assert prod[Q].shape == (4, 6)


def test_product_rejects_mismatched_rank():
    u = clients()[0]
    u[b_key(Q)] = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=b_key(Q)):
        product(u)


def test_plain_fedavg_of_factors_is_not_exact():
    ups = clients()
    gap = fedavg_product_gap(ups, WEIGHTS)
    merged = product(weighted_mean([{k: v.astype(float) for k, v in u.items()} for u in ups], WEIGHTS))
    want = target(ups, WEIGHTS)
    direct = np.sqrt(sum(np.sum((merged[p] - want[p]) ** 2) for p in want))
    assert gap == pytest.approx(direct, rel=1e-9)
    assert gap > 0.1  # of order one: the cross-covariance of random factors
    # mean(B_i A_i) - B̄Ā is exactly the weighted cross-covariance sum_i w_i (B_i - B̄)(A_i - Ā)
    w = np.asarray(WEIGHTS, float) / sum(WEIGHTS)
    a_bar = sum(wi * u[a_key(Q)].astype(float) for wi, u in zip(w, ups))
    b_bar = sum(wi * u[b_key(Q)].astype(float) for wi, u in zip(w, ups))
    cov = sum(wi * (u[b_key(Q)] - b_bar) @ (u[a_key(Q)] - a_bar) for wi, u in zip(w, ups))
    np.testing.assert_allclose(want[Q] - merged[Q], cov, atol=1e-6)


def test_gap_vanishes_when_a_is_shared():
    ups = clients()
    for u in ups[1:]:
        for p in (Q, V):
            u[a_key(p)] = ups[0][a_key(p)]
    assert fedavg_product_gap(ups, WEIGHTS) < 1e-12


def test_ffa_lora_is_exact_and_keeps_a():
    ups = clients()
    for u in ups[1:]:
        for p in (Q, V):
            u[a_key(p)] = ups[0][a_key(p)].copy()
    out = ffa_lora(ups, WEIGHTS)
    assert list(out) == list(ups[0])
    np.testing.assert_array_equal(out[a_key(Q)], ups[0][a_key(Q)])
    got, want = product(out), target(ups, WEIGHTS)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], atol=1e-6)
    np.testing.assert_allclose(out[HEAD], weighted_mean(ups, WEIGHTS)[HEAD])


def test_ffa_lora_rejects_differing_a():
    ups = clients()
    for u in ups[1:]:
        for p in (Q, V):
            u[a_key(p)] = ups[0][a_key(p)].copy()
    ups[2][a_key(V)] = ups[2][a_key(V)] + np.float32(1e-3)
    with pytest.raises(ValueError, match=rf"{a_key(V)} of client 2 differs"):
        ffa_lora(ups, WEIGHTS)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scaling", [1.0, 16 / 2])
def test_fedex_lora_is_exact(dtype, scaling):
    ups = clients(seed=1, dtype=dtype)
    factors, residual = fedex_lora(ups, WEIGHTS, scaling=scaling)
    mean = weighted_mean(ups, WEIGHTS)
    for k in mean:
        np.testing.assert_array_equal(factors[k], mean[k])  # the factors are plain FedAvg
        assert factors[k].dtype == dtype
    merged, want = product(factors, scaling), target(ups, WEIGHTS, scaling)
    assert set(residual) == {Q, V}
    for p in want:
        np.testing.assert_allclose(merged[p] + residual[p], want[p], atol=1e-6, rtol=0)
        # tighter: the residual is taken against the returned (dtype-cast) factors, so even
        # float32 factors leave only float64 rounding
        np.testing.assert_allclose(merged[p] + residual[p], want[p], atol=1e-10, rtol=0)
        assert np.abs(residual[p]).max() > 1e-2  # the residual is what FedAvg would have lost


def test_mean_product_matches_direct_sum():
    ups = clients(seed=2)
    got, want = mean_product(ups, WEIGHTS), target(ups, WEIGHTS)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], atol=1e-12)


def test_rolora_trainable_alternates():
    assert [rolora_trainable(r) for r in range(1, 5)] == ["B", "A", "B", "A"]
    with pytest.raises(ValueError, match="round must be >= 1"):
        rolora_trainable(0)


@pytest.mark.parametrize("round_", [1, 2, 7, 8])
def test_rolora_averages_only_the_trained_factor_and_is_exact(round_):
    rng = np.random.default_rng(3)
    current = lora_update(rng)
    trained = rolora_trainable(round_)
    frozen = "B" if trained == "A" else "A"
    ups = []
    for _ in range(3):
        u = lora_update(rng)
        for k in factor_keys(current, frozen):
            u[k] = current[k].copy()  # clients could not change the frozen factor
        ups.append(u)
    # a client sending garbage for the frozen factor must not matter
    ups[0][factor_keys(current, frozen)[0]] = np.full_like(current[factor_keys(current, frozen)[0]], 99.0)
    out = rolora(ups, WEIGHTS, round_, current)
    assert list(out) == list(current)
    mean = weighted_mean(ups, WEIGHTS)
    for k in factor_keys(current, frozen):
        np.testing.assert_array_equal(out[k], current[k])
    for k in factor_keys(current, trained) + [HEAD]:
        np.testing.assert_allclose(out[k], mean[k])
    ups[0][factor_keys(current, frozen)[0]] = current[factor_keys(current, frozen)[0]]
    got, want = product(out), target(ups, WEIGHTS)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], atol=1e-5)


def test_rolora_accepts_updates_without_the_frozen_factor():
    rng = np.random.default_rng(4)
    current = lora_update(rng)
    ups = [{k: v for k, v in lora_update(rng).items() if ".lora_B." not in k} for _ in range(2)]
    out = rolora(ups, [1, 1], 2, current)  # round 2 trains A, so B may be left out
    np.testing.assert_array_equal(out[b_key(Q)], current[b_key(Q)])
    np.testing.assert_allclose(out[a_key(Q)], (ups[0][a_key(Q)] + ups[1][a_key(Q)]) / 2)
