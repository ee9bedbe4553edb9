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
