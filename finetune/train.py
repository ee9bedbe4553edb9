"""Local training: AdamW on the trainable parameters, gradient clipping, a fixed step budget.

The first step's gradients are checked (`check_gradients`): a step that computes no gradient,
or a non-finite one, for the trainable parameters raises `NoGradient` instead of training
nothing in silence (a frozen layer that does not backpropagate, as bitsandbytes' inference-only
4-bit kernel, cuts every LoRA module below it off).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.batches import batch_stream, encode_example
from finetune.examples import Example
from finetune.flops import batch_tokens, token_flops
from finetune.loss import answer_loss


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 10
    epochs: int = 0  # > 0: as many steps as `epochs` passes over the data take
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = 128
    seed: int = 0
    proximal_mu: float = 0.0  # FedProx: mu/2 ||w - w_start||^2 keeps clients near the global

    def num_steps(self, num_examples: int) -> int:
        if self.epochs > 0:
            return self.epochs * math.ceil(num_examples / self.batch_size)
        return self.steps


@dataclass(frozen=True)
class TrainResult:
    steps: int
    examples: int
    loss: float  # mean training loss over the steps
    final_loss: float  # mean over the last quarter of steps
    seconds: float
    flops: float = 0.0  # training FLOPs counted from the linear layers (finetune/flops.py); 0 = not counted
    probe_norms: dict[str, float] = field(default_factory=dict)  # `probe`: each group's gradient L2 norm at the first step


class NoGradient(RuntimeError):
    """A training step computed no usable gradient for the trainable parameters."""


def check_gradients(named: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
    """Raise NoGradient unless every trainable LoRA parameter got a gradient, all of them are
    finite, and at least one is non-zero.

    A LoRA factor may legitimately get a zero gradient (A while B is still zero), never none.
    Costs one reduction per parameter: run it on the first step only.
    """
    missing = [n for n, p in named if p.grad is None and "lora_" in n]
    present = [(n, p.grad) for n, p in named if p.grad is not None]
    if missing or not present:
        first = missing[0] if missing else named[0][0] if named else "-"
        raise NoGradient(
            f"training computed no gradient for {len(missing) or len(named)} of {len(named)} trainable parameters (first: {first}): "
            "the backbone does not backpropagate to them"
        )
    bad = next((n for n, g in present if not bool(torch.isfinite(g).all())), None)
    if bad is not None:
        raise NoGradient(f"training computed a non-finite gradient for {bad}; lower the learning rate or check the data")
    if not any(bool(g.any()) for _, g in present):
        raise NoGradient(f"training computed an all-zero gradient for all {len(present)} trainable parameters: nothing would change")


def proximal_term(params: list[torch.nn.Parameter], anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx (Li et al. 2020): mu/2 times the squared distance from the round's starting point."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))


def _unfreeze(probe: Mapping[str, Sequence[torch.nn.Parameter]]) -> list[torch.nn.Parameter]:
    """Make the frozen parameters of `probe` require grad; the ones switched (`_refreeze` undoes it)."""
    frozen = [p for group in probe.values() for p in group if not p.requires_grad]
    for p in frozen:
        p.requires_grad = True
    return frozen


def _refreeze(params: list[torch.nn.Parameter]) -> None:
    for p in params:
        p.requires_grad, p.grad = False, None


def probe_norms(probe: Mapping[str, Sequence[torch.nn.Parameter]]) -> dict[str, float]:
    """Each group's gradient L2 norm (0 where no gradient reached it)."""
    return {name: math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in group if p.grad is not None)) for name, group in probe.items()}


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: TrainSettings,
    on_step: Callable[[int, float], None] | None = None,
    probe: Mapping[str, Sequence[torch.nn.Parameter]] | None = None,
) -> TrainResult:
    """Train the parameters that require grad for the configured steps; return loss and timing.

    `probe` (Kill-and-Revive's gradient score): named groups of parameters, frozen ones
    included, whose gradient norms the first step measures. The frozen ones require grad for that
    step's backward only (it runs down to the lowest of them) and are never stepped: the
    optimizer holds only the parameters that required grad on entry.
    """
    started = time.perf_counter()
    encoded = [encode_example(tokenizer, ex, settings.max_seq_len) for ex in examples]
    batches = batch_stream(encoded, settings.batch_size, tokenizer.pad_token_id, settings.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    anchors = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []
    steps = settings.num_steps(len(encoded))
    losses: list[float] = []
    per_token, flops, norms = token_flops(model).total, 0.0, {}
    probed = _unfreeze(probe) if probe else []
    model.train()
    try:
        for step in range(steps):
            batch = next(batches)
            flops += (token_flops(model).total if probed and step == 0 else per_token) * batch_tokens(batch)
            loss = answer_loss(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"train: loss became {loss.item()} at step {step + 1}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            objective = loss + proximal_term(params, anchors, settings.proximal_mu) if anchors else loss
            if not objective.requires_grad:
                raise NoGradient("training: the loss does not depend on any trainable parameter (no gradient can flow)")
            objective.backward()
            if step == 0:
                check_gradients(named)
                norms = probe_norms(probe) if probe else {}
                _refreeze(probed)
                probed = []
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1, losses[-1])
    finally:
        _refreeze(probed)
    model.eval()
    tail = losses[-max(1, len(losses) // 4):]
    return TrainResult(
        steps=steps,
        examples=len(encoded),
        loss=sum(losses) / len(losses),
        final_loss=sum(tail) / len(tail),
        seconds=time.perf_counter() - started,
        flops=flops,
        probe_norms=norms,
    )
