"""Small LoRA-shaped updates for the aggregation tests (numpy only)."""

from __future__ import annotations

import numpy as np

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"
HEAD = "base_model.model.score.modules_to_save.weight"


def lora_update(rng: np.random.Generator, rank: int = 2, *, dtype=np.float32, din: int = 6, dout: int = 4, head: bool = True) -> dict[str, np.ndarray]:
    """Two LoRA modules (q_proj, v_proj) of the given rank, plus an optional non-LoRA key."""
    out = {}
    for prefix in (Q, V):
        out[f"{prefix}.lora_A.weight"] = rng.normal(size=(rank, din)).astype(dtype)
        out[f"{prefix}.lora_B.weight"] = rng.normal(size=(dout, rank)).astype(dtype)
    if head:
        out[HEAD] = rng.normal(size=(3, dout)).astype(dtype)
    return out


def a_key(prefix: str = Q) -> str:
    return f"{prefix}.lora_A.weight"


def b_key(prefix: str = Q) -> str:
    return f"{prefix}.lora_B.weight"
