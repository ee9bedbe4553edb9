"""The module selection on the wire: names checked against the adapter, hostile values refused."""

import json

import pytest

from protos.selection import SelectionError, decode_selection, encode_selection, keys_of, module_of, modules_of, restrict

Q0, V0, Q1 = "m.layers.0.q_proj", "m.layers.0.v_proj", "m.layers.1.q_proj"
KNOWN = [Q0, V0, Q1]


def test_module_names_come_from_factor_keys_with_or_without_the_adapter_name():
    assert module_of(f"{Q0}.lora_A.weight") == Q0 and module_of(f"{Q0}.lora_B.default.weight") == Q0
    assert module_of("m.score.modules_to_save.weight") is None
    keys = [f"{Q0}.lora_A.weight", f"{Q0}.lora_B.weight", f"{Q1}.lora_A.weight", f"{Q1}.lora_B.weight", "head.weight"]
    assert modules_of(keys) == [Q0, Q1]
    assert keys_of(keys, [Q1]) == [f"{Q1}.lora_A.weight", f"{Q1}.lora_B.weight"]
    assert list(restrict({k: 0 for k in keys}, [Q0])) == keys[:2]


def test_a_selection_round_trips_in_the_adapters_order():
    assert decode_selection(encode_selection([Q1, Q0]), KNOWN) == [Q0, Q1]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "expected a JSON list"),
        (3, "expected a JSON list"),
        ("not json", "not JSON"),
        (json.dumps({"a": 1}), "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        (json.dumps([Q0, 3]), "non-empty JSON list"),
        (json.dumps([Q0, Q0]), "named twice"),
        (json.dumps([Q0, "m.layers.9.q_proj"]), "is not a LoRA module"),
        (json.dumps([Q0 + ".lora_A.weight"]), "is not a LoRA module"),
        ("[" * 100000 + "]" * 100000, "not JSON"),
        ("x" * (2 << 20), "characters"),
    ],
)
def test_a_hostile_selection_is_refused_with_a_one_line_reason(value, why):
    with pytest.raises(SelectionError) as err:
        decode_selection(value, KNOWN)
    assert why in str(err.value) and "\n" not in str(err.value)
