"""One backbone with LoRA per process: simulated clients in a worker share it, swapping arrays in.

The cache is keyed on the device and the backbone's dtype as resolved on this machine
(finetune/device.py), so "auto" and "cuda:0" share one model. LoRA is attached on the CPU in
fp32 from the seed, before the frozen backbone is cast and the model is moved: the initial
LoRA arrays are the same on every device and dtype.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from finetune.backbone import load_backbone
from finetune.device import DTYPES, cast_frozen, dtype_name, placement
from finetune.lora import LoraSettings, attach_lora, get_lora_arrays


@lru_cache(maxsize=2)
def _build(
    model_spec: str, settings: LoraSettings, seed: int, quantize: str = "none", device: str = "cpu", dtype: str = "fp32"
) -> tuple[PeftModel, PreTrainedTokenizerBase, dict[str, np.ndarray]]:
    if quantize == "none":
        model, tokenizer = load_backbone(model_spec)
        peft_model = attach_lora(model, settings, seed)
        initial = get_lora_arrays(peft_model)
        cast_frozen(peft_model, DTYPES[dtype])
        peft_model.to(device)
    else:
        from finetune.quantized import load_quantized_backbone

        model, tokenizer = load_quantized_backbone(model_spec, quantize, device=device, compute_dtype=DTYPES[dtype])
        peft_model = attach_lora(model, settings, seed)  # PEFT puts the new LoRA layers beside their base layers
        initial = get_lora_arrays(peft_model)
    return peft_model, tokenizer, initial


def _key(device: str, dtype: str) -> tuple[str, str]:
    where, kind = placement(device, dtype)
    return str(where), dtype_name(kind)


def lora_model(
    model_spec: str, settings: LoraSettings, seed: int = 0, quantize: str = "none", device: str = "auto", dtype: str = "auto"
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Backbone `model_spec` (or frozen in nf4/int8) wrapped with LoRA `settings`, once per process,
    on `device` with the frozen backbone in `dtype` (LoRA stays fp32).

    Callers must load the round's LoRA arrays before use: the cached modules hold whatever
    the previous caller left there. A device this machine lacks raises DeviceError.
    """
    model, tokenizer, _ = _build(model_spec, settings, seed, quantize, *_key(device, dtype))
    return model, tokenizer


def initial_lora_arrays(model_spec: str, settings: LoraSettings, seed: int = 0, device: str = "auto", dtype: str = "auto") -> dict[str, np.ndarray]:
    """The LoRA arrays as initialised from `seed` (unaffected by later use of the cached model;
    the same on every device and dtype)."""
    return {key: value.copy() for key, value in _build(model_spec, settings, seed, "none", *_key(device, dtype))[2].items()}
