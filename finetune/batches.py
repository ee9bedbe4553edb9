"""From examples to token batches: chat-template prompts, response-only labels, padding."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from finetune.examples import Example

IGNORE_INDEX = -100


def user_message(example: Example) -> str:
    return f"{example.instruction}\n\n{example.input}" if example.input else example.instruction


def format_prompt(tokenizer: PreTrainedTokenizerBase, example: Example) -> str:
    """The text the model sees before its answer: the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_message(example)}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"### Instruction:\n{user_message(example)}\n\n### Response:\n"


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example, max_len: int) -> dict[str, list[int]]:
    """Token ids of prompt + answer + EOS, with labels only on the answer and EOS.

    When too long, the prompt is cut from the left so the answer (what the loss covers) stays.
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, example), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer_ids = answer_ids[:max_len]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(answer_ids) - max_len):]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
    }


def collate(encoded: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into tensors (padding is masked out of the loss)."""
    width = max(len(item["input_ids"]) for item in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, item in enumerate(encoded):
        n = len(item["input_ids"])
        ids[row, :n] = torch.tensor(item["input_ids"])
        labels[row, :n] = torch.tensor(item["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_stream(encoded: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches, a fresh permutation every epoch (deterministic by seed)."""
    if not encoded:
        raise ValueError("no training examples: this client's data partition is empty")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            epoch = list(range(len(encoded)))
            rng.shuffle(epoch)
            order.extend(epoch)
        chosen, order = order[:batch_size], order[batch_size:]
        yield collate([encoded[i] for i in chosen], pad_id)


def fixed_batches(encoded: Sequence[dict[str, list[int]]], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """One pass in order, for evaluation."""
    for start in range(0, len(encoded), batch_size):
        yield collate(encoded[start : start + batch_size], pad_id)
