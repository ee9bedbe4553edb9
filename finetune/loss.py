"""Next-token loss on answer tokens, projecting to the vocabulary only where answers are predicted.

The vocabulary projection is the costliest layer of a small LM (SmolLM2: 49k x 576 weights, the
compute of about eight of its thirty blocks, at every position), and prompts are most of every
sequence. Asking the model for logits only from the batch's first answer-predicting position on
(`logits_to_keep`) gives the same loss with a cheaper step; it also makes the emulator's
speed-up over the full model the ratio of their blocks, not diluted by a head both share.

Batches are built on the CPU (finetune/batches.py) and moved to the model's device here, once
per step; the first supervised position is found on the CPU copy, so no device sync is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.batches import IGNORE_INDEX
from finetune.device import model_device


def answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) for every position from the first that predicts an answer token on.

    logits[:, t] predicts labels[:, t]; unsupervised positions carry IGNORE_INDEX.
    """
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    supervised = (labels != IGNORE_INDEX).any(0).nonzero()
    first = int(supervised[0]) if len(supervised) else 0
    keep = batch["input_ids"].shape[1] - first
    device = model_device(model)
    mask = batch.get("attention_mask")
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=None if mask is None else mask.to(device), logits_to_keep=keep).logits
    return logits[:, :-1], labels[:, first:].to(device)


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (batch x positions, fp32) and the mask of answer tokens."""
    logits, labels = answer_logits(model, batch)
    losses = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return losses, (labels != IGNORE_INDEX).to(losses.dtype)


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over all answer tokens of the batch (what HF's `.loss` computes)."""
    losses, mask = token_losses(model, batch)
    return (losses * mask).sum() / mask.sum()
