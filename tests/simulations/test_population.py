"""Populations: profile counts follow the shares, events follow the rates, all from the seed."""

from collections import Counter

import numpy as np
import pytest

from protos.profile import DeviceProfile
from finetune.partition import partition_indices, skewed_sizes
from finetune.tasks import builtin_splits
from simulations.population import Population, profile_counts, profile_from_mapping

PROFILES = (
    DeviceProfile("workstation", share=0.2),
    DeviceProfile("laptop", share=0.3, availability=0.9, dropout=0.05),
    DeviceProfile("phone", share=0.4, availability=0.7, dropout=0.1),
    DeviceProfile("kiosk", share=0.1, availability=0.6, dropout=0.2),
)


@pytest.mark.parametrize("clients", [1, 7, 50, 333, 500])
def test_profile_counts_match_shares(clients):
    population = Population(PROFILES, clients, seed=3)
    counts = population.counts()
    assert sum(counts.values()) == clients
    for profile in PROFILES:
        assert abs(counts[profile.name] - profile.share * clients) < 1
    assert Counter(population.profile_of(i).name for i in range(clients)) == Counter(counts)


def test_assignment_is_a_pure_function_of_the_seed():
    a, b, c = (Population(PROFILES, 200, seed=s) for s in (1, 1, 2))
    names = lambda p: [p.profile_of(i).name for i in range(200)]  # noqa: E731
    assert names(a) == names(b) and names(a) != names(c)
    assert [a.event(3, i) for i in range(200)] == [b.event(3, i) for i in range(200)]


def test_availability_and_dropout_rates():
    population = Population(PROFILES, 400, seed=0)
    for profile in PROFILES:
        pids = [i for i in range(400) if population.profile_of(i) is profile]
        events = Counter(population.event(r, i) for r in range(1, 51) for i in pids)
        n = sum(events.values())
        assert events["unavailable"] / n == pytest.approx(1 - profile.availability, abs=0.03)
        reachable = n - events["unavailable"]
        assert events["dropout"] / reachable == pytest.approx(profile.dropout, abs=0.03)


def test_bad_populations_are_one_line_errors():
    with pytest.raises(ValueError, match="shares must sum to 1, got 0.9"):
        Population((DeviceProfile("a", share=0.5), DeviceProfile("b", share=0.4)), 10)
    with pytest.raises(ValueError, match="unique"):
        Population((DeviceProfile("a", share=0.5), DeviceProfile("a", share=0.5)), 10)
    with pytest.raises(ValueError, match="profile 'p': unknown key 'sped'"):
        profile_from_mapping({"name": "p", "sped": 1.0})
    with pytest.raises(ValueError, match="profile 'p': availability = 0.0 must be in"):
        profile_from_mapping({"name": "p", "availability": 0.0})
    with pytest.raises(ValueError, match="quantized = 'yes' is not a bool"):
        profile_from_mapping({"name": "p", "quantized": "yes"})


def test_largest_remainder():
    assert profile_counts([0.5, 0.25, 0.25], 3) == [1, 1, 1]  # remainders .5, .75, .75
    assert profile_counts([1 / 3] * 3, 10) == [4, 3, 3]


def test_quantity_skew_sizes():
    sizes = skewed_sizes(3000, 500, 1.0, seed=0)
    assert sizes.sum() == 3000 and sizes.min() >= 1 and sizes.max() > 5 * np.median(sizes)
    train, _ = builtin_splits(50, 1, 0)
    parts = partition_indices(train, 30, "iid", seed=1, size_sigma=1.0)
    assert sorted(i for p in parts for i in p) == list(range(len(train)))
    assert [len(p) for p in parts] == list(skewed_sizes(len(train), 30, 1.0, 1))
    with pytest.raises(ValueError, match="partition-size-sigma"):
        partition_indices(train, 30, "dirichlet", size_sigma=1.0)
