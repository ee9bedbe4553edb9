import dataclasses

import numpy as np
import pytest

from aggregation import server_opt
from aggregation.rules import RULES, RuleSpec, check_secure, get_rule

NAMES = ["fedavg", "fedadam", "fedyogi", "fedavgm", "fedprox", "ffa-lora", "fedex-lora", "rolora", "hetlora", "flora", "median", "trimmed-mean"]
SECURE = {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "ffa-lora", "rolora"}


def test_registry_has_exactly_the_named_rules():
    assert set(RULES) == set(NAMES)
    for name, spec in RULES.items():
        assert isinstance(spec, RuleSpec) and spec.name == name and spec.description and spec.call
        assert callable(spec.aggregate)
        assert spec.inputs[0] == "updates"


def test_secure_compatibility():
    assert {n for n, s in RULES.items() if s.secure_compatible} == SECURE


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RULES["fedavg"].secure_compatible = False


def test_server_optimizers_exist():
    for spec in RULES.values():
        if spec.server_optimizer is not None:
            assert spec.server_optimizer in server_opt.OPTIMIZERS
    assert {n for n, s in RULES.items() if s.server_optimizer} == {"fedavgm", "fedadam", "fedyogi"}


def test_get_rule_unknown_lists_known_names():
    with pytest.raises(ValueError) as err:
        get_rule("krum")
    msg = str(err.value)
    assert "'krum'" in msg and "\n" not in msg
    assert all(name in msg for name in NAMES)


@pytest.mark.parametrize("name", sorted(set(NAMES) - SECURE))
def test_check_secure_rejects_rules_that_need_individual_updates(name):
    with pytest.raises(ValueError, match=f"^aggregation rule '{name}' needs individual updates and cannot run with secure aggregation$"):
        check_secure(name)


@pytest.mark.parametrize("name", sorted(SECURE))
def test_check_secure_accepts_sum_only_rules(name):
    assert check_secure(name).name == name


def test_mean_based_rules_aggregate_by_weighted_mean():
    ups = [{"x": np.array([0.0, 2.0])}, {"x": np.array([4.0, 6.0])}]
    for name in ("fedavg", "fedprox", "fedadam"):
        np.testing.assert_allclose(get_rule(name).aggregate(ups, [1, 3])["x"], [3.0, 5.0])
    np.testing.assert_allclose(get_rule("median").aggregate(ups)["x"], [2.0, 4.0])
