"""The unit of data everywhere in Fedsite: one instruction-following example."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """An instruction, an optional input and the exact expected output.

    `task` names the family an example came from (built-in suite) or the source
    file (user data); partitioners use it as the label for non-IID splits.
    """

    instruction: str
    input: str
    output: str
    task: str = "user"
