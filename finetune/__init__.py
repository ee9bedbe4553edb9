"""Shared kernel: backbones, LoRA, data, training and evaluation used by every layer above."""

import os

# Fedsite never downloads at run time: fail fast instead of waiting on hub look-ups.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
