"""Dense updates of the frozen base weights: the channel FedEx-LoRA and FLoRA need.

Both rules leave part of the aggregated update outside the rank-r factors: FedEx-LoRA the
residual mean(B_i@A_i) - mean(B)@mean(A), FLoRA the whole stacked product (clients restart
from B = 0). The coordinator keeps that part as one dense ΔW per LoRA module, travelling
with the LoRA arrays under `base/<module prefix>`; a model takes it as W = W0 + ΔW on the
module's frozen base layer. W0 is kept aside on first use, so a cached model that serves
many clients, rounds or runs is always W0 + the ΔW it was last given (never accumulated).

At the end the whole update, ΔW + s·B@A, is exported as an ordinary PEFT LoRA adapter of the
rank it needs (truncated SVD, exact up to float32 rounding), so stock PEFT still loads it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from safetensors.numpy import save_file

from aggregation.lora import pair_keys, product

BASE_PREFIX = "base/"

NamedArrays = Mapping[str, np.ndarray]


def split_base(arrays: NamedArrays) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(LoRA arrays, {module prefix: dense ΔW}) of a record that may carry `base/` keys."""
    lora = {k: v for k, v in arrays.items() if not k.startswith(BASE_PREFIX)}
    base = {k[len(BASE_PREFIX):]: v for k, v in arrays.items() if k.startswith(BASE_PREFIX)}
    return lora, base


def join_base(lora: NamedArrays, base: NamedArrays) -> dict[str, np.ndarray]:
    return {**lora, **{BASE_PREFIX + prefix: v for prefix, v in base.items()}}


def add_to_base(base: NamedArrays, delta: NamedArrays) -> dict[str, np.ndarray]:
    """base + delta per module (float32; a module new to `base` starts at zero)."""
    out = {k: np.asarray(v, dtype=np.float32) for k, v in base.items()}
    for prefix, d in delta.items():
        out[prefix] = (out[prefix] + d if prefix in out else d).astype(np.float32)
    return out


def _base_weight(model: PeftModel, prefix: str) -> torch.nn.Parameter:
    try:
        layer = model.get_submodule(prefix)
    except AttributeError:
        raise ValueError(f"base delta: the model has no module {prefix!r}") from None
    weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
    if weight is None or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"base delta: {prefix} has a quantized or missing weight; fedex-lora and flora fold updates into the "
            "frozen base weights, which needs an unquantized backbone (quantize = 'none')"
        )
    return weight


def apply_base_delta(model: PeftModel, deltas: NamedArrays) -> None:
    """Set every touched base weight to W0 + deltas[prefix] (W0 where no delta is given now)."""
    originals: dict[str, torch.Tensor] = model.__dict__.setdefault("_fedsite_base_originals", {})
    for prefix in set(originals) | set(deltas):
        weight = _base_weight(model, prefix)
        if prefix not in originals:
            originals[prefix] = weight.detach().clone()
        original = originals[prefix]
        with torch.no_grad():
            if prefix in deltas:
                delta = np.asarray(deltas[prefix])
                if delta.shape != tuple(original.shape):
                    raise ValueError(f"base delta: {prefix} has shape {delta.shape}, expected {tuple(original.shape)}")
                weight.copy_(original + torch.from_numpy(delta.astype(np.float32)).to(device=original.device, dtype=original.dtype))
            else:
                weight.copy_(original)


def lora_scaling(model: PeftModel) -> float:
    config = model.peft_config["default"]
    return float(config.lora_alpha) / float(config.r)


def merged_adapter(lora: NamedArrays, base: NamedArrays, scaling: float, rtol: float = 1e-6) -> tuple[dict[str, np.ndarray], int]:
    """An exact LoRA of ΔW + scaling·B@A per module, at scaling 1: (arrays, rank).

    The rank is the largest numerical rank over modules (singular values above rtol times the
    largest), smaller modules zero-padded. Keys are those of `lora`.
    """
    wanted = {prefix: d.astype(np.float64) for prefix, d in product(lora, scaling).items()}
    for prefix, d in base.items():
        wanted[prefix] = wanted.get(prefix, 0.0) + np.asarray(d, dtype=np.float64)
    factors, rank = {}, 1
    for prefix, delta in wanted.items():
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        keep = int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0
        root = np.sqrt(s[:keep])
        factors[prefix] = (root[:, None] * vt[:keep], u[:, :keep] * root[None, :])  # A (keep x in), B (out x keep)
        rank = max(rank, keep)
    out = {k: np.asarray(v, dtype=np.float32) for k, v in lora.items()}
    for prefix, (a_key, b_key) in pair_keys(lora).items():
        a, b = factors[prefix]
        out[a_key] = np.pad(a, ((0, rank - a.shape[0]), (0, 0))).astype(np.float32)
        out[b_key] = np.pad(b, ((0, 0), (0, rank - b.shape[1]))).astype(np.float32)
    return out, rank


def export_merged_adapter(model: PeftModel, lora: NamedArrays, base: NamedArrays, folder: Path, model_spec: str) -> Path:
    """Save ΔW + s·B@A as a PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`)
    of the rank it needs, alpha = rank so PEFT's scaling is 1; the backbone as `export_adapter` records it."""
    from finetune.backbone import backbone_note
    from finetune.lora import write_backbone_note

    arrays, rank = merged_adapter(lora, base, lora_scaling(model))
    note = backbone_note(model_spec)
    config = copy.deepcopy(model.peft_config["default"])
    config.r, config.lora_alpha, config.base_model_name_or_path = rank, rank, note["base_model_name_or_path"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    write_backbone_note(folder, note)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    notes = {"rank": rank, "modules": len(pair_keys(lora)), "why": "dense base update (fedex-lora / flora) folded into an exact LoRA by SVD"}
    (folder / "fedsite_merge.json").write_text(json.dumps(notes, indent=2))
    return folder


def set_global_arrays(model: PeftModel, arrays: NamedArrays) -> None:
    """Load a global record into `model`: the LoRA arrays exactly, and W0 + ΔW for its `base/` keys."""
    from finetune.lora import set_lora_arrays

    lora, base = split_base(arrays)
    set_lora_arrays(model, lora)
    apply_base_delta(model, base)
