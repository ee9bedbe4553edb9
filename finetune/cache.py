"""One backbone with LoRA per process: simulated clients in a worker share it, swapping arrays in."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from finetune.backbone import load_backbone
from finetune.lora import LoraSettings, attach_lora, get_lora_arrays


@lru_cache(maxsize=2)
def _build(model_spec: str, settings: LoraSettings, seed: int, quantize: str = "none") -> tuple[PeftModel, PreTrainedTokenizerBase, dict[str, np.ndarray]]:
    if quantize == "none":
        model, tokenizer = load_backbone(model_spec)
    else:
        from finetune.quantized import load_quantized_backbone

        model, tokenizer = load_quantized_backbone(model_spec, quantize)
    peft_model = attach_lora(model, settings, seed)
    return peft_model, tokenizer, get_lora_arrays(peft_model)


def lora_model(model_spec: str, settings: LoraSettings, seed: int = 0, quantize: str = "none") -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Backbone `model_spec` (fp32, or frozen in nf4/int8) wrapped with LoRA `settings`, once per process.

    Callers must load the round's LoRA arrays before use: the cached modules hold whatever
    the previous caller left there.
    """
    model, tokenizer, _ = _build(model_spec, settings, seed, quantize)
    return model, tokenizer


def initial_lora_arrays(model_spec: str, settings: LoraSettings, seed: int = 0) -> dict[str, np.ndarray]:
    """The LoRA arrays as initialised from `seed` (unaffected by later use of the cached model)."""
    return {key: value.copy() for key, value in _build(model_spec, settings, seed)[2].items()}
