import numpy as np
import pytest

from aggregation.user_dp import (
    adaptive_clip_update,
    adaptive_noise_multiplier,
    add_gaussian_noise,
    clip_delta,
    noisy_fraction_clipped,
    user_level_epsilon,
)
from aggregation.validate import global_l2_norm
from tests.aggregation.helpers import lora_update


def test_clip_bounds_the_delta_and_keeps_small_ones():
    rng = np.random.default_rng(0)
    reference, update = lora_update(rng), lora_update(rng)
    norm = global_l2_norm(update, reference)
    clipped, was_clipped = clip_delta(update, reference, clip_norm=norm / 4)
    assert was_clipped
    assert global_l2_norm(clipped, reference) == pytest.approx(norm / 4, rel=1e-5)
    assert all(clipped[k].dtype == update[k].dtype for k in update)
    # The direction is kept.
    a = np.concatenate([(clipped[k] - reference[k]).ravel() for k in update])
    b = np.concatenate([(update[k] - reference[k]).ravel() for k in update])
    assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) == pytest.approx(1.0, abs=1e-6)
    same, was_clipped = clip_delta(update, reference, clip_norm=norm * 2)
    assert not was_clipped and all(np.allclose(same[k], update[k]) for k in update)
    with pytest.raises(ValueError, match="keys differ"):
        clip_delta(update, {k: v for k, v in reference.items() if "lora_A" not in k}, 1.0)


def test_noise_std_is_z_times_clip_over_clients():
    rng = np.random.default_rng(1)
    aggregate = {"a": np.zeros((200, 500), np.float32), "b": np.ones(1000, np.float32)}
    noised = add_gaussian_noise(aggregate, noise_multiplier=1.5, clip_norm=0.8, num_clients=10, rng=rng)
    want = 1.5 * 0.8 / 10
    assert noised["a"].dtype == np.float32
    assert noised["a"].std() == pytest.approx(want, rel=0.01)
    assert abs(noised["a"].mean()) < 4 * want / np.sqrt(noised["a"].size)
    assert (noised["b"] - 1).std() == pytest.approx(want, rel=0.1)
    assert np.array_equal(add_gaussian_noise(aggregate, 0.0, 0.8, 10, rng)["a"], aggregate["a"])


def test_adaptive_clip_moves_toward_the_target_quantile():
    assert adaptive_clip_update(1.0, fraction_clipped=0.9, target_quantile=0.5, lr=0.2) > 1.0
    assert adaptive_clip_update(1.0, fraction_clipped=0.1, target_quantile=0.5, lr=0.2) < 1.0
    assert adaptive_clip_update(1.0, fraction_clipped=0.5, target_quantile=0.5, lr=0.2) == pytest.approx(1.0)
    assert adaptive_clip_update(2.0, 1.0, 0.5, 0.2) == pytest.approx(2.0 * np.exp(0.1))
    # Iterated on fixed norms, the bound settles near the target quantile of the norms.
    norms, clip = np.linspace(0.1, 10.0, 100), 0.01
    for _ in range(400):
        clip = adaptive_clip_update(clip, float(np.mean(norms > clip)), 0.5, 0.1)
    assert clip == pytest.approx(np.median(norms), rel=0.1)


def test_noisy_count_and_noise_split():
    rng = np.random.default_rng(2)
    assert noisy_fraction_clipped(3, 10, 0.0, rng) == 0.3
    samples = [noisy_fraction_clipped(3, 10, 0.5, rng) for _ in range(4000)]
    assert np.mean(samples) == pytest.approx(0.3, abs=0.01) and np.std(samples) == pytest.approx(0.05, rel=0.1)
    assert adaptive_noise_multiplier(1.0, 0.0) == 1.0
    assert adaptive_noise_multiplier(1.0, 5.0) == pytest.approx((1 - 0.01) ** -0.5)
    with pytest.raises(ValueError, match="whole budget"):
        adaptive_noise_multiplier(1.0, 0.4)


def test_user_level_epsilon_falls_with_noise_and_grows_with_rounds():
    from opacus.accountants import RDPAccountant

    eps = user_level_epsilon(1.0, sample_rate=0.1, rounds=50, delta=1e-5)
    assert user_level_epsilon(2.0, 0.1, 50, 1e-5) < eps < user_level_epsilon(1.0, 0.1, 100, 1e-5)
    assert user_level_epsilon(1.0, 0.05, 50, 1e-5) < eps
    accountant = RDPAccountant()
    accountant.history = [(1.0, 0.1, 50)]
    assert eps == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)
    assert user_level_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert user_level_epsilon(0.0, 0.1, 5, 1e-5) == float("inf")
    with pytest.raises(ValueError, match="sample_rate"):
        user_level_epsilon(1.0, 0.0, 5, 1e-5)
