"""Evaluation: response-token loss and exact-match accuracy of greedy answers."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from finetune.batches import encode_example, fixed_batches, format_prompt
from finetune.device import model_device, to_device
from finetune.examples import Example
from finetune.loss import token_losses
from finetune.progress import bar


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    examples: int
    per_task: dict[str, float] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list, repr=False)


def normalize_answer(text: str) -> str:
    """The first non-empty line, stripped: models often add a newline or a second sentence."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


@torch.no_grad()
def eval_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_len: int = 128, batch_size: int = 16) -> float:
    """Mean cross-entropy over answer tokens (token-weighted across batches)."""
    encoded = [encode_example(tokenizer, ex, max_len) for ex in examples]
    total, count = 0.0, 0
    with bar(len(encoded), "evaluation loss", "ex") as shown:
        for batch in fixed_batches(encoded, batch_size, tokenizer.pad_token_id):
            losses, mask = token_losses(model, batch)
            total += float((losses * mask).sum())
            count += int(mask.sum())
            shown.update(len(batch["input_ids"]))
    return total / max(count, 1)


@torch.no_grad()
def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_new_tokens: int = 16, batch_size: int = 16) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends where generation starts."""
    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    shown = bar(len(examples), "evaluation answers", "ex")
    try:
        for start in range(0, len(examples), batch_size):
            prompts = [format_prompt(tokenizer, ex) for ex in examples[start : start + batch_size]]
            inputs = to_device(tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False), model_device(model))
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = out[:, inputs["input_ids"].shape[1]:]
            answers.extend(tokenizer.batch_decode(new_tokens.cpu(), skip_special_tokens=True))
            shown.update(len(prompts))
    finally:
        shown.close()
        tokenizer.padding_side = side
    return answers


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_len: int = 128, max_new_tokens: int = 16) -> EvalResult:
    """Loss and exact-match accuracy (overall and per task family) on `examples`."""
    if not examples:
        raise ValueError("evaluate: no examples to evaluate on")
    model.eval()
    answers = generate_answers(model, tokenizer, examples, max_new_tokens)
    hits: dict[str, list[bool]] = defaultdict(list)
    for ex, answer in zip(examples, answers):
        hits[ex.task].append(normalize_answer(answer) == ex.output.strip())
    correct = sum(sum(v) for v in hits.values())
    return EvalResult(
        loss=eval_loss(model, tokenizer, examples, max_len),
        accuracy=correct / len(examples),
        examples=len(examples),
        per_task={task: sum(v) / len(v) for task, v in sorted(hits.items())},
        predictions=answers,
    )
