import numpy as np
import pytest

from aggregation.fedavg import weighted_mean
from aggregation.robust import clip_updates, coordinate_median, trimmed_mean
from aggregation.validate import global_l2_norm

from tests.aggregation.helpers import lora_update


def honest_and_outlier(n_honest=6, seed=0):
    rng = np.random.default_rng(seed)
    base = lora_update(rng)
    honest = [{k: v + rng.normal(scale=0.01, size=v.shape).astype(v.dtype) for k, v in base.items()} for _ in range(n_honest)]
    outlier = {k: np.full_like(v, 1e6) for k, v in base.items()}
    return base, honest, outlier


def test_median_is_robust_to_one_huge_outlier():
    base, honest, outlier = honest_and_outlier()
    med = coordinate_median(honest + [outlier])
    mean = weighted_mean(honest + [outlier], [1] * 7)
    for k in base:
        assert np.abs(med[k] - base[k]).max() < 0.1
        assert med[k].dtype == base[k].dtype
    assert max(np.abs(mean[k] - base[k]).max() for k in base) > 1e5  # the mean is not


def test_median_hand_computed():
    ups = [{"x": np.array([1.0, 10.0])}, {"x": np.array([2.0, 30.0])}, {"x": np.array([100.0, 20.0])}]
    np.testing.assert_array_equal(coordinate_median(ups)["x"], [2.0, 20.0])
    np.testing.assert_array_equal(coordinate_median(ups[:2])["x"], [1.5, 20.0])


def test_trimmed_mean_is_robust_to_one_huge_outlier():
    base, honest, outlier = honest_and_outlier(n_honest=9)
    tm = trimmed_mean(honest + [outlier], beta=0.1)  # trims 1 from each side of 10
    for k in base:
        assert np.abs(tm[k] - base[k]).max() < 0.1


def test_trimmed_mean_hand_computed():
    ups = [{"x": np.array([v])} for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    np.testing.assert_allclose(trimmed_mean(ups, beta=0.2)["x"], [3.0])  # drops 1 and 1000
    np.testing.assert_allclose(trimmed_mean(ups, beta=0.0)["x"], [202.0])
    np.testing.assert_allclose(trimmed_mean(ups, beta=0.19)["x"], [202.0])  # floor(0.95) = 0 trimmed


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7])
def test_trimmed_mean_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be in"):
        trimmed_mean([{"x": np.zeros(1)}], beta=beta)


def test_clip_updates_bounds_the_delta_norm():
    rng = np.random.default_rng(5)
    ref = lora_update(rng)
    small = {k: v + np.float32(1e-3) for k, v in ref.items()}
    big = {k: v + rng.normal(size=v.shape).astype(v.dtype) * 100 for k, v in ref.items()}
    out_small, out_big = clip_updates([small, big], ref, max_norm=1.0)
    for k in ref:
        np.testing.assert_array_equal(out_small[k], small[k])  # within the bound: unchanged
        assert out_big[k].dtype == ref[k].dtype
    assert global_l2_norm(out_big, ref) == pytest.approx(1.0, rel=1e-4)
    # direction is kept: the clipped delta is a positive multiple of the original delta
    d_old = np.concatenate([(big[k] - ref[k]).ravel() for k in ref]).astype(float)
    d_new = np.concatenate([(out_big[k] - ref[k]).ravel() for k in ref]).astype(float)
    cos = d_old @ d_new / np.linalg.norm(d_old) / np.linalg.norm(d_new)
    assert cos == pytest.approx(1.0, abs=1e-6)


def test_clip_updates_hand_computed():
    ref = {"x": np.array([1.0, 1.0])}
    (out,) = clip_updates([{"x": np.array([4.0, 5.0])}], ref, max_norm=2.5)  # delta (3, 4), norm 5
    np.testing.assert_allclose(out["x"], [1.0 + 1.5, 1.0 + 2.0])
    with pytest.raises(ValueError, match="max_norm must be positive"):
        clip_updates([ref], ref, max_norm=0)
