import numpy as np
import pytest

from aggregation.rules import get_rule
from coordinator.aggregate import Aggregator, train_factors

rng = np.random.default_rng(0)
CURRENT = {"m.lora_A.weight": rng.standard_normal((2, 4)).astype(np.float32), "m.lora_B.weight": np.zeros((4, 2), np.float32)}


def client(delta_a: float, delta_b: float) -> dict:
    return {"m.lora_A.weight": CURRENT["m.lora_A.weight"] + delta_a, "m.lora_B.weight": CURRENT["m.lora_B.weight"] + delta_b}


def test_fedavg_is_the_weighted_mean():
    new = Aggregator("fedavg")(CURRENT, [client(0, 1), client(0, 3)], [1, 3], 1)
    assert np.allclose(new["m.lora_B.weight"], 2.5)


def test_fedadam_steps_towards_the_mean_by_about_eta_and_keeps_state():
    agg = Aggregator("fedadam", server_lr=0.01)
    new = agg(CURRENT, [client(0, 1), client(0, 1)], [1, 1], 1)
    step = new["m.lora_B.weight"] - CURRENT["m.lora_B.weight"]
    assert np.all(step > 0) and np.all(step < 0.05)
    assert agg.state is not None and agg.state.step == 1
    assert new["m.lora_B.weight"].dtype == np.float32


def test_ffa_lora_keeps_the_shared_a_and_clients_train_only_b():
    new = Aggregator("ffa-lora")(CURRENT, [client(0, 1), client(0, 3)], [1, 1], 1)
    assert np.array_equal(new["m.lora_A.weight"], CURRENT["m.lora_A.weight"])
    assert np.allclose(new["m.lora_B.weight"], 2.0)
    assert train_factors("ffa-lora", 1) == train_factors("ffa-lora", 2) == "B"


def test_rolora_alternates_the_trained_factor():
    assert [train_factors("rolora", r) for r in (1, 2, 3)] == ["B", "A", "B"]  # B first: it starts at zero
    new = Aggregator("rolora")(CURRENT, [client(1, 5), client(3, 5)], [1, 1], 2)  # round 2: only A counts
    assert np.allclose(new["m.lora_A.weight"], CURRENT["m.lora_A.weight"] + 2)
    assert np.array_equal(new["m.lora_B.weight"], CURRENT["m.lora_B.weight"])


def test_robust_rules_ignore_an_outlier():
    updates = [client(0, 1), client(0, 1.1), client(0, 0.9), client(0, 1e6)]
    assert np.allclose(Aggregator("median")(CURRENT, updates, [1] * 4, 1)["m.lora_B.weight"], 1.05)
    assert Aggregator("trimmed-mean", trim_fraction=0.25)(CURRENT, updates, [1] * 4, 1)["m.lora_B.weight"].max() < 2


def random_client(seed: int) -> dict:
    r = np.random.default_rng(seed)
    return {"m.lora_A.weight": r.standard_normal((2, 4)).astype(np.float32), "m.lora_B.weight": r.standard_normal((4, 2)).astype(np.float32)}


def mean_delta(updates, weights, scaling):
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    return sum(wi * scaling * (u["m.lora_B.weight"].astype(np.float64) @ u["m.lora_A.weight"]) for wi, u in zip(w, updates))


@pytest.mark.parametrize("rule", ["fedex-lora", "flora"])
def test_rules_that_fold_into_the_base_stay_exact_over_rounds(rule):
    """After round k the merged update base_k + s·B_k@A_k == base_(k-1) + the weighted mean of
    round k's client products s·B_i@A_i: what the factors cannot hold accumulates in `base/m`."""
    agg, scaling, current = Aggregator(rule, lora_scaling=2.0), 2.0, dict(CURRENT)
    for rnd, seeds in enumerate([(1, 2, 3), (4, 5), (6, 7, 8)], start=1):
        updates, weights = [random_client(s) for s in seeds], [float(s) for s in seeds]
        base_before = current.get("base/m", np.zeros((4, 4)))
        current = agg(current, updates, weights, rnd)
        merged = current["base/m"] + scaling * current["m.lora_B.weight"].astype(np.float64) @ current["m.lora_A.weight"]
        np.testing.assert_allclose(merged, base_before + mean_delta(updates, weights, scaling), atol=1e-5)
        if rule == "flora":  # everything went into the base; clients restart from B = 0
            assert not current["m.lora_B.weight"].any()
            assert np.array_equal(current["m.lora_A.weight"], CURRENT["m.lora_A.weight"])
    assert set(current) == {"m.lora_A.weight", "m.lora_B.weight", "base/m"} and current["base/m"].dtype == np.float32


@pytest.mark.parametrize("rule", ["fedex-lora", "flora"])
def test_one_round_of_a_base_rule_gives_exactly_the_mean_product(rule):
    updates, weights = [random_client(s) for s in (1, 2, 3)], [1.0, 2.0, 3.0]
    new = Aggregator(rule, lora_scaling=2.0)(CURRENT, updates, weights, 1)
    merged = new["base/m"] + 2.0 * new["m.lora_B.weight"].astype(np.float64) @ new["m.lora_A.weight"]
    np.testing.assert_allclose(merged, mean_delta(updates, weights, 2.0), atol=1e-6)
    # plain FedAvg of the same factors misses the mean product: the gap the base rules remove
    avg = Aggregator("fedavg")(CURRENT, updates, weights, 1)
    assert np.abs(2.0 * avg["m.lora_B.weight"] @ avg["m.lora_A.weight"] - mean_delta(updates, weights, 2.0)).max() > 1e-2


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        get_rule("fedmagic")
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        Aggregator("fedmagic")
