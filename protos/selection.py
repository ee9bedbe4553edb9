"""The round message's module selection (Kill-and-Revive): which LoRA modules a client trains and sends.

It travels in the train message's config under `active-modules` as a JSON list of module names:
PEFT state-dict key prefixes without the factor (`...layers.3.self_attn.q_proj`), a string so it
fits the legacy FitIns config of the SecAgg+ path as well as a ConfigRecord. Absent = every
module. Both ends share this module; on the client the list is hostile input, checked against
the adapter's own modules before anything is frozen (`decode_selection`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence

ACTIVE_KEY = "active-modules"
GRAD_NORMS_KEY = "kr-grad-norms"  # reply metric (kr-score "gradient"): every module's gradient norm, in `sorted(modules)` order
MAX_SELECTION_CHARS = 1 << 20  # far above any adapter's module list; a larger string is refused unread
_FACTOR = re.compile(r"\.lora_[AB](\.[^.]+)?\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class SelectionError(ValueError):
    """A module selection that is not a subset of the adapter's modules; the message says why."""


def module_of(key: str) -> str | None:
    """The module a LoRA factor key belongs to (`X.lora_A.weight` -> `X`), None for other keys."""
    match = _FACTOR.search(key)
    return key[: match.start()] if match else None


def layer_of(module: str) -> int | None:
    """The transformer block index in a module name (`...layers.3.self_attn.q_proj` -> 3)."""
    match = _LAYER.search(module)
    return int(match.group(1)) if match else None


def selectable(module: str, lowest_block: int) -> bool:
    """Whether `module` may be selected under `kr-lowest-block`: in that block or above, or in no block."""
    layer = layer_of(module)
    return layer is None or layer >= lowest_block


def modules_of(keys: Iterable[str]) -> list[str]:
    """The LoRA modules among `keys`, in first-seen order."""
    return list(dict.fromkeys(m for m in map(module_of, keys) if m is not None))


def keys_of(keys: Iterable[str], active: Iterable[str]) -> list[str]:
    """The keys (in their order) of the LoRA factors of the `active` modules."""
    wanted = set(active)
    return [k for k in keys if module_of(k) in wanted]


def restrict(arrays: Mapping, active: Iterable[str]) -> dict:
    """`arrays` cut to the factors of the `active` modules."""
    return {k: arrays[k] for k in keys_of(arrays, active)}


def encode_selection(active: Sequence[str]) -> str:
    return json.dumps(list(active), separators=(",", ":"))


def decode_selection(text: object, known: Sequence[str]) -> list[str]:
    """The selected modules (in the adapter's order), checked: a JSON list of distinct names,
    each one of `known`, at least one. Raises SelectionError with a one-line reason."""
    if not isinstance(text, str):
        raise SelectionError(f"{ACTIVE_KEY}: a {type(text).__name__}, expected a JSON list of module names")
    if len(text) > MAX_SELECTION_CHARS:
        raise SelectionError(f"{ACTIVE_KEY}: {len(text)} characters, more than {MAX_SELECTION_CHARS}")
    try:
        names = json.loads(text)
    except (ValueError, RecursionError):
        raise SelectionError(f"{ACTIVE_KEY}: not JSON") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SelectionError(f"{ACTIVE_KEY}: expected a non-empty JSON list of module names")
    if len(set(names)) != len(names):
        raise SelectionError(f"{ACTIVE_KEY}: a module is named twice")
    allowed = set(known)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SelectionError(f"{ACTIVE_KEY}: {unknown[0][:120]!r} is not a LoRA module of this adapter ({len(unknown)} unknown)")
    chosen = set(names)
    return [m for m in known if m in chosen]
