import math

import numpy as np
import pytest

from aggregation import user_dp
from aggregation.user_dp import (
    SecureGaussian,
    adaptive_clip_update,
    adaptive_noise_multiplier,
    add_gaussian_noise,
    clip_delta,
    noisy_fraction_clipped,
    secure_standard_normal,
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


def test_secure_normals_have_the_standard_normal_statistics():
    n = 2 * user_dp._CHUNK + 3  # odd, and across chunk boundaries
    z = secure_standard_normal(n)
    assert z.shape == (n,) and z.dtype == np.float64 and np.isfinite(z).all()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert z.std() == pytest.approx(1.0, abs=5 * se / math.sqrt(2))
    centred = (z - z.mean()) / z.std()
    assert abs(np.mean(centred**3)) < 5 * math.sqrt(6 / n)  # skewness
    assert abs(np.mean(centred**4) - 3) < 5 * math.sqrt(24 / n)  # excess kurtosis
    for k, inside in ((1, 0.682689492), (2, 0.954499736), (3, 0.997300204)):
        assert np.mean(np.abs(z) < k) == pytest.approx(inside, abs=5 * math.sqrt(inside * (1 - inside) / n))
    # Box-Muller pairs (cos, sin of one draw) sit half a chunk apart: they must be uncorrelated, as must neighbours.
    half = user_dp._CHUNK // 2
    assert abs(np.corrcoef(z[:half], z[half : 2 * half])[0, 1]) < 5 / math.sqrt(half)
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 * se
    assert secure_standard_normal(0).shape == (0,) and secure_standard_normal(1).shape == (1,)


def test_secure_gaussian_has_generator_normals_signature_and_never_repeats():
    source = SecureGaussian()
    sample = source.normal(2.0, 0.5, size=(400, 500))
    assert sample.shape == (400, 500)
    assert sample.mean() == pytest.approx(2.0, abs=0.005) and sample.std() == pytest.approx(0.5, rel=0.01)
    assert isinstance(source.normal(), float) and source.normal(size=()).shape == ()
    assert not np.array_equal(source.normal(size=64), source.normal(size=64))
    assert not np.array_equal(SecureGaussian().normal(size=64), SecureGaussian().normal(size=64))


def urandom_zeros(monkeypatch) -> list[int]:
    """Make the OS CSPRNG return zeros, recording how many bytes were asked for."""
    asked: list[int] = []

    def zeros(n: int) -> bytes:
        asked.append(n)
        return bytes(n)

    monkeypatch.setattr(user_dp.os, "urandom", zeros)
    return asked


def test_by_default_noise_and_count_noise_come_from_the_os_csprng(monkeypatch):
    """Without an injected generator the noise is os.urandom's: all-zero bytes give the Box-Muller
    extreme (sqrt(-2 ln 2^-53) times cos 0) and 0 (sin 0), and numpy's generators are not touched."""
    numpy_state = np.random.get_state()[1].copy()
    asked = urandom_zeros(monkeypatch)
    extreme = math.sqrt(-2 * math.log(2.0**-53))
    noised = add_gaussian_noise({"a": np.zeros(10, np.float32)}, noise_multiplier=1.0, clip_norm=2.0, num_clients=4)
    assert asked == [16 * 5]
    assert np.allclose(noised["a"], [extreme * 0.5] * 5 + [0.0] * 5)
    assert noisy_fraction_clipped(3, 10, 0.5) == pytest.approx((3 + 0.5 * extreme) / 10)
    assert asked == [80, 16]
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_secure_default_noise_has_the_right_scale_and_differs_per_call():
    aggregate = {"a": np.zeros((200, 500), np.float32)}
    first, second = add_gaussian_noise(aggregate, 1.5, 0.8, 10)["a"], add_gaussian_noise(aggregate, 1.5, 0.8, 10)["a"]
    assert first.dtype == np.float32 and first.std() == pytest.approx(0.12, rel=0.01)
    assert not np.allclose(first, second)
    samples = [noisy_fraction_clipped(3, 10, 0.5) for _ in range(4000)]
    assert np.mean(samples) == pytest.approx(0.3, abs=0.01) and np.std(samples) == pytest.approx(0.05, rel=0.1)
