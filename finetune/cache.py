"""One backbone with LoRA per process: simulated clients in a worker share it, swapping arrays in."""

from __future__ import annotations

from functools import lru_cache

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from finetune.backbone import load_backbone
from finetune.lora import LoraSettings, attach_lora


@lru_cache(maxsize=2)
def lora_model(model_spec: str, settings: LoraSettings, seed: int = 0) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Backbone `model_spec` wrapped with LoRA `settings`, loaded once per process.

    Callers must load the round's LoRA arrays before use: the cached modules hold whatever
    the previous caller left there.
    """
    model, tokenizer = load_backbone(model_spec)
    return attach_lora(model, settings, seed), tokenizer
