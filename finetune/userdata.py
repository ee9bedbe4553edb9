"""The user's own data: JSONL files and `datasets` folders saved to disk.

Both carry `instruction`, `output` and optionally `input` (default "") and `task` (default:
the file or folder name, so partitioners can tell sources apart). Every problem is a
`DataError` with one line naming the file, the line or row, and what was expected.

A JSONL file is split at b"\n" only (a trailing "\r" is dropped), so U+2028, U+2029 and U+0085
inside a JSON string stay part of it, and each line is decoded as UTF-8 on its own, so a bad
byte is reported with its line. Numbers are never converted: every field of an example is a
string, so a number (however large, `1e999`, `NaN` or `Infinity` included) where a string is
expected is reported as the wrong type, and one elsewhere on the line is ignored like any other
extra field. Brackets nested too deeply for the parser are an error naming the line.
"""

from __future__ import annotations

import codecs
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from finetune.examples import Example

REQUIRED = ("instruction", "output")
OPTIONAL = ("input", "task")


class DataError(ValueError):
    """User data that cannot be read as examples."""


class _Number:
    """A JSON number, kept as its text: examples hold no numbers, so no conversion can fail."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


_DECODER = json.JSONDecoder(parse_int=_Number, parse_float=_Number, parse_constant=_Number)
_TYPE_NAMES = {str: "string", _Number: "number", int: "number", float: "number", bool: "boolean", list: "array", dict: "object", type(None): "null"}


def _type_name(value: object) -> str:
    """JSON's name for the type of `value` (a dataset row's numbers are "number" too)."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _example(record: Mapping[str, object], where: str, default_task: str) -> Example:
    """Validate one record (a JSON object or a dataset row) into an Example."""
    for field in REQUIRED:
        if field not in record:
            raise DataError(f"{where}: missing field '{field}' (expected {', '.join(REQUIRED)}; optional {', '.join(OPTIONAL)})")
    values: dict[str, str] = {}
    for field in REQUIRED + OPTIONAL:
        value = record.get(field)
        if value is None and field in OPTIONAL:
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{field}' must be a string, got {_type_name(value)}")
        if field in REQUIRED and not value.strip():
            raise DataError(f"{where}: field '{field}' is empty")
        values[field] = value
    return Example(values["instruction"], values.get("input", ""), values["output"], values.get("task") or default_task)


_BLANK = object()


def _parse_line(raw: bytes, where: str) -> object:
    """One line's JSON value, or _BLANK for a blank line; every failure is a DataError naming `where`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start + 1} of the line)") from None
    if not text.strip():
        return _BLANK
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON (brackets nested too deeply)") from None


def load_jsonl(path: str | Path) -> list[Example]:
    """One example per non-blank line (lines end at b"\n" only); `task` defaults to the file stem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
    examples = []
    for number, line in enumerate(data.removeprefix(codecs.BOM_UTF8).split(b"\n"), start=1):
        where = f"{path}:{number}"
        record = _parse_line(line.removesuffix(b"\r"), where)
        if record is _BLANK:
            continue
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type_name(record)}")
        examples.append(_example(record, where, path.stem))
    if not examples:
        raise DataError(f"{path}: empty file; expected one JSON object per line")
    return examples


def load_dataset_folder(path: str | Path) -> list[Example]:
    """A folder from `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (its "train" split, else
    its first split); `task` defaults to the folder name."""
    from datasets import Dataset, DatasetDict, load_from_disk

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: folder not found")
    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({reason})") from None
    where = str(path)
    if isinstance(loaded, DatasetDict):
        if not loaded:
            raise DataError(f"{path}: DatasetDict has no splits")
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded, where = loaded[split], f"{path}[{split}]"
    assert isinstance(loaded, Dataset)
    for field in REQUIRED:
        if field not in loaded.column_names:
            raise DataError(f"{where}: missing column '{field}' (columns: {', '.join(loaded.column_names)})")
    if loaded.num_rows == 0:
        raise DataError(f"{where}: no rows")
    columns = [c for c in REQUIRED + OPTIONAL if c in loaded.column_names]
    rows = loaded.select_columns(columns).to_list()
    return [_example(row, f"{where}: row {i}", path.name) for i, row in enumerate(rows)]


def load_examples(spec: str) -> list[Example]:
    """A `.jsonl` file or a `datasets` folder, chosen by the shape of `spec`."""
    if spec.endswith(".jsonl"):
        return load_jsonl(spec)
    if Path(spec).is_dir():
        return load_dataset_folder(spec)
    raise DataError(f"data: '{spec}' is not usable; expected 'builtin', a .jsonl file or a datasets folder")


def split_train_test(examples: Sequence[Example], test_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle cut into (train, test); both keep at least one example when there are two.

    Shuffled order matters: callers take prefixes of the test split for evaluation, and user
    files are often sorted by task.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test-fraction: expected a number in [0, 1), got {test_fraction}")
    order = list(range(len(examples)))
    random.Random(f"fedsite-split:{seed}").shuffle(order)
    n_test = round(len(examples) * test_fraction)
    if test_fraction > 0 and len(examples) >= 2:
        n_test = min(max(1, n_test), len(examples) - 1)
    else:
        n_test = 0
    test = [examples[i] for i in order[:n_test]]
    train = [examples[i] for i in order[n_test:]]
    return train, test
