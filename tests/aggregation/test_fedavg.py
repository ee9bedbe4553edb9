import numpy as np
import pytest

from aggregation.fedavg import normalized_weights, weighted_mean


def test_weighted_mean_matches_hand_computed():
    u1 = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([[0.0]], dtype=np.float32)}
    u2 = {"w": np.array([3.0, 6.0], dtype=np.float32), "b": np.array([[4.0]], dtype=np.float32)}
    out = weighted_mean([u1, u2], [1, 3])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    np.testing.assert_allclose(out["b"], [[3.0]])
    assert out["w"].dtype == np.float32 and out["b"].shape == (1, 1)


def test_weighted_mean_is_scale_invariant_in_weights():
    rng = np.random.default_rng(0)
    ups = [{"x": rng.normal(size=(3, 3))} for _ in range(4)]
    np.testing.assert_allclose(weighted_mean(ups, [1, 2, 3, 4])["x"], weighted_mean(ups, [10, 20, 30, 40])["x"])


def test_weighted_mean_accumulates_in_float64():
    ups = [{"x": np.array([1.0 + 2**-11], dtype=np.float16)}] * 1000
    assert weighted_mean(ups, [1.0] * 1000)["x"][0] == np.float16(1.0 + 2**-11)


@pytest.mark.parametrize(("updates", "weights", "match"), [([], [], "no updates"), ([{"x": np.zeros(1)}], [1, 2], "1 updates but 2 weights"), ([{"x": np.zeros(1)}], [0], "positive")])
def test_weighted_mean_rejects_bad_input(updates, weights, match):
    with pytest.raises(ValueError, match=match):
        weighted_mean(updates, weights)


def test_normalized_weights():
    np.testing.assert_allclose(normalized_weights([1, 3], 2), [0.25, 0.75])
    with pytest.raises(ValueError, match="non-negative"):
        normalized_weights([2, -1], 2)
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        normalized_weights([1], 2)
