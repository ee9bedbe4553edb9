"""Importance-adaptive upload: each LoRA module at fp16, int8 or 4-bit by its share of the update's norm.

A module is the LoRA A and B tensors of one target module (names differing only in
`lora_A`/`lora_B`). Its share is its part of the update's squared L2 norm (shares sum to 1).
With M modules, a share of at least 2/M travels at fp16, at least 1/(2M) at int8, the rest at
4-bit NF4. With a byte budget, modules are then made coarser one step at a time, least
important first, until the payload fits; a budget below the all-4-bit size is a CodecError.

Layout: the header `__codec__` is "adaptive"; each tensor has the parts of its own codec
(protos/codecs.py, exactly as that codec writes them) plus `{name}::prec`, one uint8 naming
its precision (0 fp16, 1 int8, 2 4-bit). Decoding groups the tensors by tag and decodes each
group with the fixed codec's own `decode`, so the result equals decoding each tensor with
its codec, and every check that decode makes (shapes against the arrays the client was sent,
lengths, scales) applies; a missing, malformed or unknown tag is a CodecError naming the tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np

from protos.codecs import HEADER_KEY, INT8_BLOCK, NF4_BLOCK, SEP, CodecError, decode, encode

ADAPTIVE = "adaptive"
PRECISIONS = ("fp16", "int8", "4bit")  # tag value = index, finest first
TAG = "prec"
_MODULE = re.compile(r"\.lora_[AB](?=\.|$)")
_FP16_MAX = float(np.finfo(np.float16).max)


def module_of(name: str) -> str:
    """The module a tensor belongs to: its name without the lora_A / lora_B part."""
    return _MODULE.sub(".lora_*", name, count=1)


def tensor_nbytes(shape: tuple[int, ...], codec: str) -> int:
    """Bytes a tensor takes in an adaptive payload at `codec`: values, block scales, shape and tag."""
    m = math.prod(shape)
    data = {"fp16": 2 * m, "int8": m + 4 * -(-m // INT8_BLOCK), "4bit": (NF4_BLOCK // 2 + 4) * -(-m // NF4_BLOCK)}[codec]
    return data + 4 * len(shape) + 1


def payload_nbytes(shapes: Mapping[str, tuple[int, ...]], precisions: Mapping[str, str]) -> int:
    """`encoded_nbytes` of the adaptive payload of tensors of these shapes at these precisions."""
    return len(ADAPTIVE) + sum(tensor_nbytes(shape, precisions[name]) for name, shape in shapes.items())


def choose_precisions(named: Mapping[str, np.ndarray], budget_bytes: int = 0) -> dict[str, str]:
    """Tensor name -> fp16, int8 or 4bit (all tensors of a module alike); see the module docstring."""
    arrays = {name: np.asarray(a, np.float32) for name, a in named.items()}
    modules: dict[str, list[str]] = {}
    for name in arrays:
        modules.setdefault(module_of(name), []).append(name)
    energy = {m: sum(float(np.square(arrays[n], dtype=np.float64).sum()) for n in names) for m, names in modules.items()}
    total = sum(v for v in energy.values() if math.isfinite(v))
    share = {m: (v / total if total > 0 else 1 / len(modules)) if math.isfinite(v) else math.inf for m, v in energy.items()}
    count = max(1, len(modules))
    level = {m: 0 if s >= 2 / count else 1 if s >= 0.5 / count else 2 for m, s in share.items()}
    for m, names in modules.items():
        finite = all(np.isfinite(arrays[n]).all() for n in names)
        if not finite:
            level[m] = 0  # fp16 carries NaN/Inf, so the coordinator's validation rejects the update
        elif level[m] == 0 and any(arrays[n].size and np.abs(arrays[n]).max() > _FP16_MAX for n in names):
            level[m] = 1  # beyond float16's range: int8 scales per block
    shapes = {n: a.shape for n, a in arrays.items()}

    def size() -> int:
        return payload_nbytes(shapes, {n: PRECISIONS[level[m]] for m, names in modules.items() for n in names})

    if budget_bytes:
        order = sorted(modules, key=lambda m: (share[m], m))  # least important first
        while size() > budget_bytes:
            coarser = [m for m in order if level[m] < 2 and math.isfinite(share[m])]
            if not coarser:
                raise CodecError(f"upload budget {budget_bytes} bytes is below the update's smallest adaptive size ({size()} bytes at 4-bit); raise upload-budget-mb")
            level[coarser[0]] += 1
    return {n: PRECISIONS[level[m]] for m, names in modules.items() for n in names}


def encode_adaptive(named: Mapping[str, np.ndarray], budget_bytes: int = 0) -> dict[str, np.ndarray]:
    """The adaptive payload of `named` (float arrays), within `budget_bytes` (0 = no budget)."""
    precisions = choose_precisions(named, budget_bytes)
    payload = {HEADER_KEY: np.frombuffer(ADAPTIVE.encode("ascii"), np.uint8).copy()}
    parts: dict[str, np.ndarray] = {}
    for codec in PRECISIONS:
        group = {n: a for n, a in named.items() if precisions[n] == codec}
        if group:
            parts.update({k: v for k, v in encode(group, codec).items() if k != HEADER_KEY})
    for name in named:  # the original order, each tensor's parts then its tag
        prefix = f"{name}{SEP}"
        payload.update({k: v for k, v in parts.items() if k.startswith(prefix) and SEP not in k[len(prefix):]})
        payload[f"{name}{SEP}{TAG}"] = np.asarray([PRECISIONS.index(precisions[name])], np.uint8)
    return payload


def is_adaptive(arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether a payload (numpy arrays) says it is adaptive."""
    raw = arrays.get(HEADER_KEY)
    return isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.ndim == 1 and raw.tobytes() == ADAPTIVE.encode("ascii")


def decode_adaptive(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Decode an adaptive payload of numpy arrays; every tag and part checked before use."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        if key == HEADER_KEY:
            continue
        name, sep, part = key.rpartition(SEP)
        if not sep or not name:
            raise CodecError(f"unexpected payload key {key!r}")
        grouped.setdefault(name, {})[part] = value
    groups: dict[str, dict[str, np.ndarray]] = {codec: {} for codec in PRECISIONS}
    for name, parts in grouped.items():
        tag = parts.pop(TAG, None)
        if tag is None:
            raise CodecError(f"tensor {name!r}: missing precision tag {TAG!r} in an adaptive payload")
        if not isinstance(tag, np.ndarray) or tag.dtype != np.uint8 or tag.shape != (1,) or int(tag[0]) >= len(PRECISIONS):
            raise CodecError(f"tensor {name!r}: precision tag must be one uint8 in 0..{len(PRECISIONS) - 1} ({', '.join(PRECISIONS)})")
        groups[PRECISIONS[int(tag[0])]].update({f"{name}{SEP}{part}": value for part, value in parts.items()})
    decoded: dict[str, np.ndarray] = {}
    for codec, parts in groups.items():
        if parts:
            header = np.frombuffer(codec.encode("ascii"), np.uint8).copy()
            decoded.update(decode({HEADER_KEY: header, **parts}, expected))
    return {name: decoded[name] for name in grouped}
