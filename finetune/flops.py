"""Training FLOPs of a step, counted from the model's linear layers: a load-independent compute measure.

Per token, each linear layer with `i` inputs and `o` outputs costs
    forward                      2 i o
    backward, input gradient     2 i o   when a trainable parameter sits below it (the gradient must pass)
    backward, weight gradient    2 i o   when its own weight is trainable
so a fully trained model costs the usual 6N per token and a frozen backbone with LoRA on every
layer about 4N. Backward stops at the lowest trainable module: with LoRA only in the top blocks
(Kill-and-Revive keeping only high modules active, an emulator's top adapter) the step costs
nearer 2N. Attention scores (the sequence-squared terms), norms and the optimizer are left out;
they are small next to the linears at these sequence lengths. Quantized linears (bitsandbytes
Linear4bit / Linear8bitLt subclass nn.Linear) count at their logical shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenFlops:
    """FLOPs per token of one training step, by part."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def token_flops(model: torch.nn.Module) -> TokenFlops:
    """FLOPs per token of a training step of `model` as it stands (which parameters require grad)."""
    forward = backward = 0.0
    below_trainable = False  # a trainable parameter appeared earlier in module order (the forward order)
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, torch.nn.Linear):
            cost = 2.0 * module.in_features * module.out_features
            forward += cost
            if below_trainable:
                backward += cost
            if any(p.requires_grad for p in own):
                backward += cost
        if any(p.requires_grad for p in own):
            below_trainable = True
    return TokenFlops(forward, backward)


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Token positions the step computes, padding included (padded positions cost the same)."""
    return int(batch["input_ids"].numel())
