"""LoRA through Hugging Face PEFT: attach, extract as named arrays, load back, export.

The trainable LoRA state travels as `dict[str, np.ndarray]` keyed by PEFT's own state-dict
names (adapter name stripped), so an exported adapter is exactly what stock PEFT saves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def to_peft(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.targets),
            task_type="CAUSAL_LM",
        )


def attach_lora(model: PreTrainedModel, settings: LoraSettings, seed: int = 0) -> PeftModel:
    """Wrap `model` with fresh LoRA modules (A random from `seed`, B zero); only LoRA trains."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, settings.to_peft())
    except ValueError as err:
        raise ValueError(f"lora: cannot attach to this model: {str(err).splitlines()[0]}") from err
    finally:
        torch.random.set_rng_state(state)
    return peft_model


def get_lora_arrays(model: PeftModel) -> dict[str, np.ndarray]:
    """The trainable LoRA state as float32 numpy copies, in PEFT's key order."""
    state = get_peft_model_state_dict(model)
    return {key: tensor.detach().cpu().numpy().copy() for key, tensor in state.items()}


def set_lora_arrays(model: PeftModel, arrays: Mapping[str, np.ndarray]) -> None:
    """Load named arrays into the LoRA modules exactly; any key or shape mismatch is an error."""
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(arrays))
    unknown = sorted(set(arrays) - set(expected))
    if missing or unknown:
        what = f"missing {missing[0]!r}" if missing else f"unknown {unknown[0]!r}"
        raise ValueError(f"lora: arrays do not match the model's LoRA modules ({what}, {len(missing)} missing, {len(unknown)} unknown)")
    tensors = {}
    for key, ref in expected.items():
        value = np.asarray(arrays[key])
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"lora: {key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        tensors[key] = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))
    set_peft_model_state_dict(model, tensors)


def set_trainable_factors(model: PeftModel, factors: str = "AB") -> None:
    """Train only lora_A, only lora_B, or both ("A", "B", "AB"): FFA-LoRA and RoLoRA freeze one."""
    if factors not in ("A", "B", "AB"):
        raise ValueError(f"lora: train-factors must be 'A', 'B' or 'AB', got {factors!r}")
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.requires_grad = "A" in factors
        elif "lora_B" in name:
            param.requires_grad = "B" in factors


def trainable_lora_parameters(model: PeftModel) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if p.requires_grad and "lora_" in name]


def export_adapter(model: PeftModel, folder: Path, model_spec: str) -> Path:
    """Save in PEFT format (`adapter_config.json` + `adapter_model.safetensors`) for the backbone
    `model_spec` names: `base_model_name_or_path` is its portable id, the local path goes to
    `fedsite_backbone.json` (finetune/backbone.py)."""
    from finetune.backbone import backbone_note

    folder = Path(folder)
    note = backbone_note(model_spec)
    # saved against the local path, so PEFT checks the base's vocabulary there and never asks the hub
    model.peft_config["default"].base_model_name_or_path = note["local_path"]
    model.save_pretrained(str(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = note["base_model_name_or_path"]
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_backbone_note(folder, note)
    return folder


def write_backbone_note(folder: Path, note: dict[str, str]) -> None:
    from finetune.backbone import BACKBONE_NOTE

    (Path(folder) / BACKBONE_NOTE).write_text(json.dumps(note, indent=2) + "\n")


def load_adapter(folder: str | Path, device: str = "cpu") -> tuple[PeftModel, Any]:
    """An exported adapter on its backbone, resolved locally (never from the hub): (PeftModel, tokenizer)."""
    from finetune.backbone import backbone_for_adapter, load_backbone

    model, tokenizer = load_backbone(backbone_for_adapter(folder))
    return PeftModel.from_pretrained(model.to(device), str(folder)), tokenizer
