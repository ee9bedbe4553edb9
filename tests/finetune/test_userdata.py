"""User data: JSONL and datasets folders, one-line errors, seeded train/test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from finetune.examples import Example
from finetune.userdata import DataError, load_dataset_folder, load_examples, load_jsonl, split_train_test

ROWS = [
    {"instruction": "Add.", "input": "1 + 2", "output": "3"},
    {"instruction": "Greet.", "output": "hello", "task": "greet"},
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _error(call, *args) -> str:
    with pytest.raises(DataError) as err:
        call(*args)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_load_jsonl_fields_defaults_and_blank_lines(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1])])
    assert load_jsonl(path) == [
        Example("Add.", "1 + 2", "3", "mine"),
        Example("Greet.", "", "hello", "greet"),
    ]


def test_jsonl_invalid_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [json.dumps(ROWS[0]), "", '{"instruction": "x", "output": '])
    message = _error(load_jsonl, path)
    assert "bad.jsonl:3" in message and "invalid JSON" in message


def test_jsonl_missing_field_named(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), json.dumps({"instruction": "x"})])
    message = _error(load_jsonl, path)
    assert "d.jsonl:2" in message and "'output'" in message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ({"instruction": "x", "output": 3}, "'output' must be a string"),
        ({"instruction": "x", "input": ["a"], "output": "y"}, "'input' must be a string"),
        ({"instruction": "x", "output": "  "}, "'output' is empty"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_jsonl_bad_values(tmp_path, line, expected):
    path = _write(tmp_path / "v.jsonl", [json.dumps(line)])
    message = _error(load_jsonl, path)
    assert "v.jsonl:1" in message and expected in message


def test_jsonl_empty_and_missing_file(tmp_path):
    empty = _write(tmp_path / "empty.jsonl", ["", ""])
    assert "empty" in _error(load_jsonl, empty)
    assert "not found" in _error(load_jsonl, tmp_path / "nope.jsonl")


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """U+2028, U+2029 and U+0085 are line breaks to str.splitlines but valid inside JSON strings."""
    odd = "a\u2028b\u2029c\u0085d\x1ce"
    path = tmp_path / "odd.jsonl"
    lines = [json.dumps({"instruction": odd, "output": odd}, ensure_ascii=False), json.dumps(ROWS[1])]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())  # CRLF endings too
    assert load_jsonl(path) == [Example(odd, "", odd, "odd"), Example("Greet.", "", "hello", "greet")]
    path.write_bytes((lines[0] + "\n" + '{"instruction": "x", "output": ' + "\n").encode())
    assert "odd.jsonl:2: invalid JSON" in _error(load_jsonl, path)  # the line after the odd one is line 2


def test_jsonl_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"instruction": "x\xff", "output": "y"}\n')
    message = _error(load_jsonl, path)
    assert "bytes.jsonl:2: not UTF-8 text (invalid start byte at byte 19 of the line)" in message


def test_jsonl_utf8_byte_order_mark_is_allowed(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert load_jsonl(path) == [Example("Add.", "1 + 2", "3", "bom")]


@pytest.mark.parametrize(
    "number",
    ["1" * 5000, "-" + "9" * 5000, "1e999", "-1e999", "1." + "5" * 5000, "NaN", "Infinity", "-Infinity"],
    ids=["5000-digit-int", "negative-5000-digit-int", "1e999", "-1e999", "5000-digit-float", "NaN", "Infinity", "-Infinity"],
)
def test_jsonl_numbers_of_any_size_are_the_wrong_type_where_a_string_is_expected(tmp_path, number):
    path = tmp_path / "n.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"instruction": "x", "output": ' + number + "}\n")
    assert "n.jsonl:2: field 'output' must be a string, got number" in _error(load_jsonl, path)
    path.write_text('{"instruction": "x", "output": "y", "score": ' + number + "}\n")  # an extra field is ignored
    assert load_jsonl(path) == [Example("x", "", "y", "n")]


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_jsonl_deep_nesting_names_the_line(tmp_path, depth):
    path = tmp_path / "deep.jsonl"
    deep = '{"instruction": "x", "output": "y", "extra": ' + "[" * depth + "]" * depth + "}"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + deep + "\n")
    assert "deep.jsonl:3: invalid JSON (brackets nested too deeply)" in _error(load_jsonl, path)


@pytest.mark.parametrize(("line", "kind"), [("null", "null"), ("3", "number"), ('"text"', "string"), ("true", "boolean"), ("[1]", "array")])
def test_jsonl_a_line_that_is_not_an_object_names_its_type(tmp_path, line, kind):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    assert f"t.jsonl:2: expected a JSON object, got {kind}" in _error(load_jsonl, path)


def test_dataset_folder_round_trip(tmp_path):
    # from_list takes its columns from the first row; a null task falls back to the folder name.
    Dataset.from_list([{**ROWS[0], "task": None}, ROWS[1]]).save_to_disk(str(tmp_path / "plain"))
    loaded = load_dataset_folder(tmp_path / "plain")
    assert loaded == [Example("Add.", "1 + 2", "3", "plain"), Example("Greet.", "", "hello", "greet")]


def test_dataset_dict_prefers_train_split(tmp_path):
    other = Dataset.from_list([{"instruction": "Other.", "output": "o"}])
    train = Dataset.from_list([{"instruction": "Train.", "output": "t"}])
    DatasetDict({"validation": other, "train": train}).save_to_disk(str(tmp_path / "both"))
    assert load_dataset_folder(tmp_path / "both") == [Example("Train.", "", "t", "both")]
    DatasetDict({"validation": other}).save_to_disk(str(tmp_path / "only"))
    assert load_dataset_folder(tmp_path / "only") == [Example("Other.", "", "o", "only")]


def test_dataset_folder_errors(tmp_path):
    Dataset.from_list([{"instruction": "x", "answer": "y"}]).save_to_disk(str(tmp_path / "cols"))
    assert "missing column 'output'" in _error(load_dataset_folder, tmp_path / "cols")
    Dataset.from_list([{"instruction": "x", "output": 5}]).save_to_disk(str(tmp_path / "types"))
    assert "row 0" in _error(load_dataset_folder, tmp_path / "types")
    (tmp_path / "random").mkdir()
    assert "save_to_disk" in _error(load_dataset_folder, tmp_path / "random")


def test_load_examples_dispatch(tmp_path):
    path = _write(tmp_path / "a.jsonl", [json.dumps(ROWS[0])])
    assert load_examples(str(path)) == load_jsonl(path)
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "folder"))
    assert load_examples(str(tmp_path / "folder")) == load_dataset_folder(tmp_path / "folder")
    message = _error(load_examples, str(tmp_path / "data.csv"))
    assert "expected 'builtin', a .jsonl file or a datasets folder" in message


def test_split_train_test_deterministic_and_disjoint():
    examples = [Example("q", str(i), str(i)) for i in range(50)]
    train, test = split_train_test(examples, 0.2, seed=0)
    assert len(test) == 10 and len(train) == 40
    assert sorted(train + test, key=lambda e: int(e.input)) == examples
    assert (train, test) == split_train_test(examples, 0.2, seed=0)
    assert test != split_train_test(examples, 0.2, seed=1)[1]
    assert [len(part) for part in split_train_test(examples[:2], 0.01, seed=0)] == [1, 1]
    with pytest.raises(ValueError, match="test-fraction"):
        split_train_test(examples, 1.0, seed=0)
