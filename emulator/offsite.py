"""What offsite clients train, as named arrays in the backbone's own block numbering.

An emulator holds the adapter blocks at other positions than the full backbone (block 29 of
SmolLM2 is block 9 of a 12-block emulator). On the wire and in the aggregate the trainable
state is keyed by ORIGINAL block index, so the coordinator aggregates it and loads it into
the full backbone (the plug-in) without caring where a client's emulator keeps the block.

Three modes, chosen per run:
- "lora":     LoRA (PEFT) on the adapter blocks; the arrays are the LoRA factors (small uploads);
- "lora-top": LoRA on the top adapter blocks only; the bottom ones ship exact and stay frozen, so
              the blocks that train see the middle's output, which distillation matches to the
              backbone's, and nothing trained sits before the emulated middle;
- "blocks":   the adapter blocks themselves train, as in the paper; the arrays are their weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from peft import PeftModel
from transformers import PreTrainedModel

from emulator.build import adapter_positions, adapter_state, attach_adapter_lora, freeze_non_adapter, load_adapter_state
from emulator.layers import LayerMap
from finetune.choices import CHOICES
from finetune.lora import LoraSettings, get_lora_arrays, set_lora_arrays

MODES = CHOICES["offsite-train"]  # ("lora", "lora-top", "blocks"): the run config checks the same tuple
LORA_MODES = ("lora", "lora-top")
_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"offsite: train mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def renumber(arrays: Mapping[str, np.ndarray], mapping: Mapping[int, int]) -> dict[str, np.ndarray]:
    """Rename `.layers.<i>.` to `.layers.<mapping[i]>.` in every key; a block outside `mapping` is an error."""
    out = {}
    for key, value in arrays.items():
        match = _BLOCK.search(key)
        if match is None or int(match.group(1)) not in mapping:
            raise ValueError(f"offsite: array '{key}' is not in an adapter block")
        out[f"{key[: match.start(1)]}{mapping[int(match.group(1))]}{key[match.end(1) :]}"] = value
    return out


def trainable_model(model: PreTrainedModel, layer_map: LayerMap, mode: str, settings: LoraSettings, seed: int = 0) -> PreTrainedModel:
    """`model` (emulator or full backbone) made ready to train its adapter blocks in `mode`."""
    if check_mode(mode) in LORA_MODES:
        model.requires_grad_(False)
        return attach_adapter_lora(model, layer_map, settings, seed, top_only=mode == "lora-top")
    freeze_non_adapter(model, layer_map)
    return model


def _to_original(model: PreTrainedModel, layer_map: LayerMap) -> dict[int, int]:
    return {position: original for original, position in adapter_positions(base_model(model), layer_map).items()}


def base_model(model: PreTrainedModel) -> PreTrainedModel:
    """The plain model under a PEFT wrapper (the model itself when it has none)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def get_offsite_arrays(model: PreTrainedModel, layer_map: LayerMap, mode: str) -> dict[str, np.ndarray]:
    """The trainable state of `trainable_model(...)`, keyed by original block index."""
    if check_mode(mode) in LORA_MODES:
        return renumber(get_lora_arrays(model), _to_original(model, layer_map))
    return adapter_state(model, layer_map)


def set_offsite_arrays(model: PreTrainedModel, arrays: Mapping[str, np.ndarray], layer_map: LayerMap, mode: str) -> None:
    """Load arrays from `get_offsite_arrays` (of any model with the same layer map) exactly."""
    if check_mode(mode) in LORA_MODES:
        to_position = {original: position for position, original in _to_original(model, layer_map).items()}
        set_lora_arrays(model, renumber(arrays, to_position))
    else:
        load_adapter_state(model, arrays, layer_map)
