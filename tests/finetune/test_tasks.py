"""Built-in task suite: determinism, coverage, correct exact-match answers, disjoint splits."""

from __future__ import annotations

import datetime
import random

import pytest

from finetune.tasks import TASK_FAMILIES, builtin_splits, generate_suite


def test_at_least_six_families_with_fixed_instructions():
    assert len(TASK_FAMILIES) >= 6
    for name, family in TASK_FAMILIES.items():
        examples = [family(random.Random(i)) for i in range(30)]
        assert {ex.task for ex in examples} == {name}
        assert len({ex.instruction for ex in examples}) == 1, name
        assert len({ex.input for ex in examples}) > 20, name  # the variable part is in input


def test_deterministic_by_seed():
    assert generate_suite(5, seed=1) == generate_suite(5, seed=1)
    assert generate_suite(5, seed=1) != generate_suite(5, seed=2)
    assert builtin_splits(20, 5, seed=3) == builtin_splits(20, 5, seed=3)


def test_round_robin_and_family_selection():
    suite = generate_suite(3, seed=0)
    names = list(TASK_FAMILIES)
    assert [ex.task for ex in suite] == names * 3
    only = generate_suite(4, seed=0, families=["sort", "date"])
    assert [ex.task for ex in only] == ["sort", "date"] * 4
    # A family's examples do not depend on which other families are generated.
    assert [ex for ex in suite if ex.task == "sort"] == [ex for ex in only if ex.task == "sort"][:3]


def test_unknown_family_is_one_line_error_naming_it():
    with pytest.raises(ValueError) as err:
        generate_suite(2, seed=0, families=["sort", "poetry"])
    message = str(err.value)
    assert "poetry" in message and "arithmetic" in message and "\n" not in message


def test_answers_single_line_nonempty():
    for ex in generate_suite(50, seed=7):
        assert ex.output and ex.output.strip() == ex.output and "\n" not in ex.output
        assert "\n" not in ex.input and ex.instruction


def test_answers_recomputed_from_inputs():
    suite = generate_suite(40, seed=11)
    by_task: dict[str, list] = {}
    for ex in suite:
        by_task.setdefault(ex.task, []).append(ex)
    for ex in by_task["arithmetic"]:
        a, op, b = ex.input.split()
        assert int(ex.output) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert int(a) < 100 and int(b) < 100 and int(ex.output) >= 0
    for ex in by_task["sort"]:
        numbers = [int(x) for x in ex.input.split()]
        assert 4 <= len(numbers) <= 6
        assert ex.output == " ".join(str(x) for x in sorted(numbers))
    for ex in by_task["reverse"]:
        assert 3 <= len(ex.input) <= 6 and ex.input.isalpha() and ex.input.islower()
        assert ex.output == ex.input[::-1] != ex.input
    factors = {("km", "m"): 1000, ("kg", "g"): 1000, ("m", "cm"): 100, ("hours", "minutes"): 60,
               ("minutes", "seconds"): 60, ("days", "hours"): 24}
    for ex in by_task["convert"]:
        value, src, _to, dst = ex.input.split()
        assert int(ex.output) == int(value) * factors[(src, dst)]
    for ex in by_task["date"]:
        day = datetime.date.fromisoformat(ex.input)
        assert ex.output == day.strftime("%d/%m/%Y")
    for ex in by_task["lookup"]:
        pairs, key = ex.input.split(". Key: ")
        values = dict(pair.split("=") for pair in pairs.split(", "))
        assert ex.output == values[key]


def test_builtin_splits_sizes_and_disjoint():
    train, test = builtin_splits(200, 20, seed=0)
    assert len(train) == 200 * len(TASK_FAMILIES) and len(test) == 20 * len(TASK_FAMILIES)
    train_keys = {(ex.instruction, ex.input) for ex in train}
    test_keys = [(ex.instruction, ex.input) for ex in test]
    assert not train_keys & set(test_keys)
    assert len(set(test_keys)) == len(test_keys)
    assert [ex.task for ex in test[: len(TASK_FAMILIES)]] == list(TASK_FAMILIES)  # any prefix covers all


def test_builtin_splits_reports_exhausted_space():
    # convert has 6 unit pairs x 99 values: 5000 training draws leave nothing unseen.
    with pytest.raises(ValueError, match="convert"):
        builtin_splits(5000, 50, seed=0)
