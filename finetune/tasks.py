"""The built-in task suite: generated instruction tasks with exact-match answers, no download.

Each family is a pure function of a `random.Random`. Instructions are fixed per family and the
variable part goes to `input`, so a small model only has to learn one short, regular answer
format per family. Answers are single lines that can be checked by string equality.
"""

from __future__ import annotations

import calendar
import random
from collections.abc import Callable, Sequence

from finetune.examples import Example

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"
_UNITS: tuple[tuple[str, str, int], ...] = (
    ("km", "m", 1000),
    ("kg", "g", 1000),
    ("m", "cm", 100),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
)


def arithmetic(rng: random.Random) -> Example:
    """Add or subtract two numbers below 100; subtraction never goes negative."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        return Example("Calculate the result.", f"{a} + {b}", str(a + b), "arithmetic")
    a, b = max(a, b), min(a, b)
    return Example("Calculate the result.", f"{a} - {b}", str(a - b), "arithmetic")


def sort(rng: random.Random) -> Example:
    """Sort 4-6 integers below 50 ascending; answer space-separated like the input."""
    numbers = [rng.randint(0, 49) for _ in range(rng.randint(4, 6))]
    return Example(
        "Sort the numbers in ascending order.",
        " ".join(map(str, numbers)),
        " ".join(map(str, sorted(numbers))),
        "sort",
    )


def reverse(rng: random.Random) -> Example:
    """Reverse a pronounceable 3-6 letter non-palindrome (consonant/vowel alternation tokenizes compactly)."""
    while True:  # palindromes would teach copying, not reversing
        length, start = rng.randint(3, 6), rng.randint(0, 1)
        word = "".join(rng.choice(_CONSONANTS if (i + start) % 2 == 0 else _VOWELS) for i in range(length))
        if word != word[::-1]:
            break
    return Example("Reverse the letters of the word.", word, word[::-1], "reverse")


def convert(rng: random.Random) -> Example:
    """Convert a whole quantity to a smaller unit; the answer is the bare integer."""
    src, dst, factor = rng.choice(_UNITS)
    value = rng.randint(1, 99)
    return Example("Convert the quantity to the requested unit.", f"{value} {src} to {dst}", str(value * factor), "convert")


def date(rng: random.Random) -> Example:
    """Reformat a valid calendar date from YYYY-MM-DD to DD/MM/YYYY."""
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    return Example(
        "Rewrite the date in DD/MM/YYYY format.",
        f"{year:04d}-{month:02d}-{day:02d}",
        f"{day:02d}/{month:02d}/{year:04d}",
        "date",
    )


def lookup(rng: random.Random) -> Example:
    """Read the value of one key from 3-5 distinct single-letter keys with digit values."""
    keys = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 5))
    values = {key: rng.randint(0, 9) for key in keys}
    key = rng.choice(keys)
    pairs = ", ".join(f"{k}={v}" for k, v in values.items())
    return Example("Give the value of the requested key.", f"{pairs}. Key: {key}", str(values[key]), "lookup")


TASK_FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": arithmetic,
    "sort": sort,
    "reverse": reverse,
    "convert": convert,
    "date": date,
    "lookup": lookup,
}


def _check_families(families: Sequence[str] | None) -> list[str]:
    names = list(TASK_FAMILIES) if families is None else list(dict.fromkeys(families))
    if not names:
        raise ValueError(f"families: empty; expected some of {', '.join(TASK_FAMILIES)}")
    for name in names:
        if name not in TASK_FAMILIES:
            raise ValueError(f"families: unknown task family '{name}'; expected one of {', '.join(TASK_FAMILIES)}")
    return names


def _family_rng(seed: int, name: str, stream: str) -> random.Random:
    """One generator per family and stream, so adding a family never changes the others."""
    return random.Random(f"fedsite:{seed}:{name}:{stream}")


def generate_suite(per_task: int, seed: int, families: Sequence[str] | None = None) -> list[Example]:
    """`per_task` examples of each family, interleaved round-robin (any prefix covers all tasks)."""
    if per_task < 0:
        raise ValueError(f"per_task: expected a non-negative integer, got {per_task}")
    names = _check_families(families)
    rngs = {name: _family_rng(seed, name, "train") for name in names}
    return [TASK_FAMILIES[name](rngs[name]) for _ in range(per_task) for name in names]


def builtin_splits(train_per_task: int, test_per_task: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, test) of the whole suite; no test (instruction, input) occurs in train.

    Test examples come from their own generator streams; a draw already seen in train or in
    test is skipped, so test examples are also unique. Both lists are interleaved by family.
    """
    if test_per_task < 0:
        raise ValueError(f"test_per_task: expected a non-negative integer, got {test_per_task}")
    train = generate_suite(train_per_task, seed)
    seen = {(ex.instruction, ex.input) for ex in train}
    per_family: dict[str, list[Example]] = {}
    for name, family in TASK_FAMILIES.items():
        rng, picked = _family_rng(seed, name, "test"), []
        attempts = 0
        while len(picked) < test_per_task:
            attempts += 1
            if attempts > 100 * (test_per_task + 10):
                raise ValueError(
                    f"test_per_task: could not draw {test_per_task} '{name}' test examples unseen in train; "
                    f"lower train_per_task ({train_per_task}) or test_per_task"
                )
            example = family(rng)
            key = (example.instruction, example.input)
            if key not in seen:
                seen.add(key)
                picked.append(example)
        per_family[name] = picked
    test = [per_family[name][i] for i in range(test_per_task) for name in TASK_FAMILIES]
    return train, test
