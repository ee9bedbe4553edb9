import pytest
import torch

from finetune.batches import IGNORE_INDEX, collate, encode_example
from finetune.examples import Example
from finetune.loss import answer_logits, answer_loss, token_losses

EXAMPLES = [
    Example("Reverse the word.", "abc", "cba", "reverse"),
    Example("Sort the letters of this rather long word, please.", "dcba", "abcd", "sort"),
    Example("Say hi.", "", "hi there, friend", "greet"),
]


def batch_of(tokenizer, examples=EXAMPLES):
    return collate([encode_example(tokenizer, ex, 128) for ex in examples], tokenizer.pad_token_id)


def test_answer_loss_equals_the_full_sequence_loss(tiny):
    model, tokenizer = tiny
    batch = batch_of(tokenizer)
    with torch.no_grad():
        expected = model(**batch).loss
        assert torch.allclose(answer_loss(model, batch), expected, atol=1e-6)


def test_logits_are_projected_only_from_the_first_answer_position(tiny):
    model, tokenizer = tiny
    batch = batch_of(tokenizer)
    labels = batch["labels"][:, 1:]
    first = int((labels != IGNORE_INDEX).any(0).nonzero()[0])
    assert first > 0  # the prompts are left out of the projection
    with torch.no_grad():
        logits, kept = answer_logits(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[1] == labels.shape[1] - first and torch.equal(kept, labels[:, first:])
    assert torch.allclose(logits, full[:, first:-1], atol=1e-5)
    assert (labels[:, :first] == IGNORE_INDEX).all()  # nothing supervised was dropped


def test_per_token_losses_mask_every_non_answer_token(tiny):
    model, tokenizer = tiny
    batch = batch_of(tokenizer)
    with torch.no_grad():
        losses, mask = token_losses(model, batch)
    answers = sum(len([t for t in encode_example(tokenizer, ex, 128)["labels"] if t != IGNORE_INDEX]) for ex in EXAMPLES)
    assert int(mask.sum()) == answers and losses.shape == mask.shape
    assert torch.isfinite(losses).all()


def test_gradients_match_the_full_sequence_loss(tiny):
    model, tokenizer = tiny
    batch = batch_of(tokenizer)
    weight = model.model.layers[0].mlp.down_proj.weight
    weight.requires_grad_(True)
    grads = []
    for loss_of in (lambda: model(**batch).loss, lambda: answer_loss(model, batch)):
        weight.grad = None
        loss_of().backward()
        grads.append(weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3])
def test_single_and_several_rows(tiny, rows):
    model, tokenizer = tiny
    batch = batch_of(tokenizer, EXAMPLES[:rows])
    with torch.no_grad():
        assert torch.allclose(answer_loss(model, batch), model(**batch).loss, atol=1e-6)
