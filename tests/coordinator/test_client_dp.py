"""Client-level DP at the coordinator: the noise is the OS CSPRNG's, and no noise state is kept."""

import numpy as np
import pytest

from aggregation import user_dp
from aggregation.user_dp import SecureGaussian
from coordinator.client_dp import ClientLevelDP

CURRENT = {"a": np.zeros((100, 100), np.float32), "b": np.zeros(7, np.float32)}


def updates(n: int, scale: float) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{k: (v + rng.normal(0, scale, v.shape)).astype(np.float32) for k, v in CURRENT.items()} for _ in range(n)]


def noise_of(dp: ClientLevelDP, mean: dict[str, np.ndarray]) -> np.ndarray:
    noised, _ = dp.release(CURRENT, mean, num_clients=4, sample_rate=0.5)
    return np.concatenate([(noised[k] - mean[k]).ravel() for k in CURRENT])


def test_the_default_noise_source_is_the_csprng_and_has_no_seed():
    dp = ClientLevelDP(noise_multiplier=2.0, clip_norm=1.0)
    assert isinstance(dp.rng, SecureGaussian)
    assert "seed" not in ClientLevelDP.__dataclass_fields__
    first, second = noise_of(dp, CURRENT), noise_of(ClientLevelDP(noise_multiplier=2.0, clip_norm=1.0), CURRENT)
    assert first.std() == pytest.approx(2.0 * 1.0 / 4, rel=0.03)
    assert not np.allclose(first, second)  # two coordinators (or a run and its resumption) never share noise


def test_state_dict_holds_no_noise_state_and_an_old_rng_entry_is_ignored():
    dp = ClientLevelDP(adaptive=True, count_stddev=1.0)
    dp(CURRENT, updates(5, 0.01), 0.5)
    state = dp.state_dict()
    assert set(state) == {"clip_norm", "rounds"} and state["rounds"] == 1
    resumed = ClientLevelDP(adaptive=True, count_stddev=1.0)
    resumed.load_state_dict({**state, "rng": np.random.default_rng(3).bit_generator.state})  # as older checkpoints held
    assert (resumed.clip_norm, resumed.rounds) == (dp.clip_norm, 1) and isinstance(resumed.rng, SecureGaussian)


def test_update_and_count_noise_both_draw_from_os_urandom(monkeypatch):
    asked = []
    urandom = user_dp.os.urandom

    def counting(n: int) -> bytes:
        asked.append(n)
        return urandom(n)

    monkeypatch.setattr(user_dp.os, "urandom", counting)
    numpy_state = np.random.get_state()[1].copy()
    ClientLevelDP(adaptive=True, count_stddev=1.0)(CURRENT, updates(5, 0.01), 0.5)
    assert asked == [16, 16 * 5000, 16 * 4]  # the clipped count, then "a" (10000 values) and "b" (7)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_a_test_may_inject_a_seeded_generator_for_reproducible_noise():
    a = noise_of(ClientLevelDP(rng=np.random.default_rng(7)), CURRENT)
    b = noise_of(ClientLevelDP(rng=np.random.default_rng(7)), CURRENT)
    assert np.array_equal(a, b)
