import numpy as np
import pytest

from coordinator.aggregate import Aggregator, check_rule, train_factors

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


def test_rules_that_change_base_weights_or_unknown_names_are_refused():
    for name in ("flora", "fedex-lora"):
        with pytest.raises(ValueError, match="base weights"):
            check_rule(name)
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        Aggregator("fedmagic")
