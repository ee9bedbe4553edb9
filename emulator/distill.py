"""Distil an emulator's kept middle toward the full backbone (the paper's NLKD step).

Layer drop leaves the top adapter blocks reading a hidden state the backbone never produced;
distillation trains the kept middle blocks (only them) so the emulator behaves like the full
model again, then freezes them. Objectives:

- "logits": KL(full || emulator) of the next-token distributions over real tokens.
  It is what the clients' loss sees, and it is not swamped by the few massive residual-stream
  dimensions of Llama-family models (on SmolLM2 the hidden-state MSE starts near 4e4 and
  hardly moves in 150 steps, while the emulator's zero-shot loss stays far from the model's).
- "hidden": MSE of the hidden state entering the top adapter (the layer-wise target).
- "logits+hidden" (default): KL plus that MSE with every dimension scaled by the backbone's
  spread, so the top adapter blocks train on inputs like the ones they get once plugged in.
  On SmolLM2 (stride 2, 100 steps; adapter blocks then trained 30 steps on the emulator) the
  plug-in's eval loss was 1.57 against 1.66 after plain KL.

Batches should look like what clients train on (chat-formatted instructions): an emulator
distilled on raw text matches the backbone there and not on the clients' prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emulator.build import decoder_layers, freeze_non_adapter
from emulator.layers import LayerMap
from finetune.batches import collate, encode_example
from finetune.config import DEFAULT_DISTILL_OBJECTIVE, DISTILL_OBJECTIVES
from finetune.device import model_device, to_device
from finetune.examples import Example


HELD_BATCHES = 2  # distillation batches never trained on, that choose which step's weights are kept


def text_batches(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 8, max_length: int = 64
) -> list[dict[str, torch.Tensor]]:
    """Padded token batches (input_ids, attention_mask) of raw `texts`."""
    return [
        dict(tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True, max_length=max_length))
        for i in range(0, len(texts), batch_size)
    ]


def example_batches(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int = 8, max_len: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Padded batches of whole examples (prompt in the chat template + answer), as clients see them."""
    encoded = [encode_example(tokenizer, example, max_len) for example in examples]
    batches = []
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i : i + batch_size], tokenizer.pad_token_id)
        batches.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    return batches


def split_held(batches: list, count: int = HELD_BATCHES) -> tuple[list, list]:
    """(train, held): the last `count` batches held out to choose the distilled weights by, when
    at least as many are left to train on; else every batch trains and none is held out."""
    if len(batches) < 2 * count:
        return batches, []
    return batches[:-count], batches[-count:]


@dataclass
class HeldScores:
    """Collects `distill_middle`'s held-out scores (pass it as `on_held`): what the start scored,
    and which step's weights were kept (the first lowest score, as `distill_middle` keeps)."""

    scores: list[tuple[int, float]] = field(default_factory=list)

    def __call__(self, step: int, loss: float) -> None:
        self.scores.append((step, loss))

    def summary(self) -> dict[str, float | int] | None:
        """{"before", "kept", "kept_step"}, or None when nothing was held out."""
        if not self.scores:
            return None
        kept_step, kept = min(self.scores, key=lambda score: score[1])
        return {"before": self.scores[0][1], "kept": kept, "kept_step": kept_step}


def _schedule(steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first ~10 % of steps (at most 20), then linear decay to zero."""
    warmup = max(1, min(20, steps // 10))
    return lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1.0 - step / steps)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _scored_positions(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, seq) mask of the real tokens after the prefix all rows share.

    Every chat-formatted example starts with the same system prompt; those positions are left
    out of the KL (identical in every row, and the lm_head over a 49k vocabulary dominates a
    distillation step's memory traffic), except the last, which predicts the first differing token.
    """
    same = (input_ids == input_ids[:1]).all(dim=0) & (mask > 0).all(dim=0)
    shared = int(same.long().cumprod(0).sum()) if input_ids.shape[0] > 1 else 0
    scored = mask > 0
    scored[:, : max(0, shared - 1)] = False  # the last shared token predicts the first differing one
    return scored


def _standardized_error(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token mean squared error with every dimension scaled by the target's spread over the
    batch's real tokens, so that the few massive dimensions weigh like the others."""
    weights = mask.unsqueeze(-1)
    count = weights.sum().clamp(min=1)
    mean = (target * weights).sum((0, 1)) / count
    spread = (((target - mean) ** 2 * weights).sum((0, 1)) / count).sqrt().clamp(min=1e-3)
    return (((hidden - target) / spread) ** 2).mean(-1)


def _loss(emulator: PreTrainedModel, full_model: PreTrainedModel, inputs: Mapping[str, torch.Tensor], objective: str, emulator_in: int, full_in: int) -> torch.Tensor:
    """The distillation objective on one batch (`inputs` on the emulator's device)."""
    device = inputs["input_ids"].device
    mask = torch.ones(inputs["input_ids"].shape, device=device) if inputs["attention_mask"] is None else inputs["attention_mask"].float()
    with torch.no_grad():
        full_out = full_model.model(**inputs, output_hidden_states=objective != "logits")
    out = emulator.model(**inputs, output_hidden_states=objective != "logits")
    loss = torch.zeros((), device=device)
    if objective in ("logits", "logits+hidden"):
        scored = _scored_positions(inputs["input_ids"], mask)
        with torch.no_grad():
            target = F.log_softmax(full_model.lm_head(full_out.last_hidden_state[scored]).float(), dim=-1)
        log_probs = F.log_softmax(emulator.lm_head(out.last_hidden_state[scored]).float(), dim=-1)
        loss = loss + F.kl_div(log_probs, target, log_target=True, reduction="batchmean")
    if objective == "hidden":
        error = (out.hidden_states[emulator_in] - full_out.hidden_states[full_in]) ** 2
        loss = loss + _masked_mean(error.mean(-1), mask)
    if objective == "logits+hidden":
        loss = loss + _masked_mean(_standardized_error(out.hidden_states[emulator_in], full_out.hidden_states[full_in], mask), mask)
    return loss


def _held_loss(loss_on: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], held: Sequence[Mapping[str, torch.Tensor]], emulator: PreTrainedModel) -> float:
    """Mean objective over the held-out batches, in eval mode and without gradients."""
    was_training = emulator.training
    emulator.eval()
    with torch.no_grad():
        value = sum(float(loss_on(b)) for b in held) / len(held)
    emulator.train(was_training)
    return value


def distill_middle(
    emulator: PreTrainedModel,
    full_model: PreTrainedModel,
    layer_map: LayerMap,
    batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor],
    *,
    steps: int = 100,
    lr: float | None = None,
    objective: str = DEFAULT_DISTILL_OBJECTIVE,
    on_step: Callable[[int, float], None] | None = None,
    params: Sequence[torch.nn.Parameter] | None = None,
    rank: int = 0,
    held: Iterable[Mapping[str, torch.Tensor] | torch.Tensor] | None = None,
    on_held: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the kept middle blocks toward `full_model` under `objective`, then freeze them again.

    Returns the loss of each step. Run before quantizing (the package stores the result).
    `rank` > 0 trains rank-`rank` factors beside the middle Linears instead of their weights and
    folds them in at the end (W += B A): the middle moves only along a low-rank change, as
    it does under emulator/refresh.py's per-round refreshes.
    `lr` defaults to 3e-4 for the weights, 1e-3 for factors.
    Both models must be on one device (the emulator's); batches are moved there step by step.
    `params` trains these instead (emulator/refresh.py: low-rank factors on a frozen, maybe
    quantized middle) and leaves every parameter's trainability as it was.

    `held` batches (never trained on) are scored before the first step and after every tenth of
    the steps; the parameters that scored best are kept (`on_held(step, loss)` sees each score).
    So distillation never hands back an emulator further from the backbone than it started: AdamW
    moves every weight by about the learning rate whatever the gradient's size, and an emulator
    that already matches (nothing dropped: loss 0, gradient rounding noise) is pushed away (SmolLM2,
    nothing dropped: KL 0 after no step, 0.32 after one warm-up step at 3e-5, 0.64 after two).
    """
    refresh = params is not None
    low_rank = rank > 0 and not refresh
    lr = (1e-3 if refresh or low_rank else 3e-4) if lr is None else lr
    if objective not in DISTILL_OBJECTIVES:
        raise ValueError(f"emulator: distillation objective must be one of {', '.join(DISTILL_OBJECTIVES)}, got {objective!r}")
    if emulator.config.emulator_quantization and not refresh:
        raise ValueError("emulator: distil before quantizing the middle")
    batches = [b if isinstance(b, Mapping) else {"input_ids": b} for b in batches]
    if not batches or steps < 1:
        raise ValueError("emulator: distillation needs at least one batch and one step")
    emulator_in, full_in = layer_map.emulator_index()[layer_map.top[0]], layer_map.top[0]
    layers = decoder_layers(emulator)
    trainable = {p: p.requires_grad for p in emulator.parameters()}
    device = model_device(emulator)
    if model_device(full_model) != device:
        raise ValueError(f"emulator: distillation needs both models on one device (emulator on {device}, backbone on {model_device(full_model)})")
    if refresh:
        params = list(params)
    elif low_rank:
        from emulator.refresh import attach_refresh, refresh_parameters

        attach_refresh(emulator, layer_map, rank)
        params = refresh_parameters(emulator)
    else:
        params = [p for position in layer_map.middle_positions() for p in layers[position].parameters()]
    was_training = emulator.training
    emulator.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps))
    emulator.train()
    full_model.eval()

    def loss_on(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return _loss(emulator, full_model, to_device({"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}, device), objective, emulator_in, full_in)

    held = [b if isinstance(b, Mapping) else {"input_ids": b} for b in held or ()]
    check = max(1, steps // 10)
    best = (_held_loss(loss_on, held, emulator), 0, [p.detach().clone() for p in params]) if held else None
    if best is not None and on_held is not None:
        on_held(0, best[0])
    losses = []
    for step in range(steps):
        loss = loss_on(batches[step % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if best is not None and ((step + 1) % check == 0 or step + 1 == steps):
            value = _held_loss(loss_on, held, emulator)
            if on_held is not None:
                on_held(step + 1, value)
            if value < best[0]:
                best = (value, step + 1, [p.detach().clone() for p in params])
    if best is not None and best[1] != steps:  # a later step was worse on the held-out batches: go back
        with torch.no_grad():
            for p, saved in zip(params, best[2]):
                p.copy_(saved)
    emulator.train(was_training)
    if refresh:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        return losses
    if low_rank:
        from emulator.refresh import fold_refresh

        fold_refresh(emulator, layer_map)
    freeze_non_adapter(emulator, layer_map)
    emulator.config.emulator_distilled = True
    return losses
