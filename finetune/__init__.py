"""Shared kernel: backbones, LoRA, data, training and evaluation used by every layer above."""
