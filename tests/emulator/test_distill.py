import json

import numpy as np
import pytest
import torch

from emulator.build import adapter_state, build_emulator
from emulator.cli import distillation_batches
from emulator.distill import _scored_positions, distill_middle, example_batches, text_batches
from finetune.batches import encode_example
from finetune.examples import Example
from finetune.userdata import DataError

TEXTS = [f"item {i}: {'abcdefgh'[i % 8] * (i % 5 + 1)} = {i * 7}" for i in range(16)]


def middle_mse(emulator, full, lm, batches):
    with torch.no_grad():
        total = 0.0
        for b in batches:
            h = emulator.model(**b, output_hidden_states=True).hidden_states[lm.emulator_index()[lm.top[0]]]
            t = full.model(**b, output_hidden_states=True).hidden_states[lm.top[0]]
            total += float(((h - t) ** 2).mean())
    return total / len(batches)


def output_kl(emulator, full, batches):
    """Mean KL(full || emulator) of the next-token distributions over real tokens."""
    with torch.no_grad():
        total = 0.0
        for b in batches:
            p = torch.log_softmax(full(**b).logits, -1)
            q = torch.log_softmax(emulator(**b).logits, -1)
            kl = (p.exp() * (p - q)).sum(-1)
            total += float((kl * b["attention_mask"]).sum() / b["attention_mask"].sum())
    return total / len(batches)


def trainable_blocks(model):
    return {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}


def test_hidden_objective_reduces_middle_mse_and_freezes(tiny8, map8):
    full, tokenizer = tiny8
    emulator = build_emulator(full, map8)
    batches = text_batches(tokenizer, TEXTS, batch_size=8, max_length=32)
    adapters_before = adapter_state(emulator, map8)
    before = middle_mse(emulator, full, map8, batches)
    losses = distill_middle(emulator, full, map8, batches, steps=12, lr=3e-3, objective="hidden")
    after = middle_mse(emulator, full, map8, batches)
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert after < 0.5 * before
    assert emulator.config.emulator_distilled
    adapters_after = adapter_state(emulator, map8)
    assert all(np.array_equal(adapters_before[k], adapters_after[k]) for k in adapters_before)
    assert trainable_blocks(emulator) == {"0", "1", "4", "5"}


@pytest.mark.parametrize("objective", ["logits", "logits+hidden"])
def test_logits_objectives_bring_the_emulator_output_toward_the_model(tiny8, map8, objective):
    full, tokenizer = tiny8
    emulator = build_emulator(full, map8)
    batches = text_batches(tokenizer, TEXTS, batch_size=8, max_length=32)
    adapters_before = adapter_state(emulator, map8)
    before, mse_before = output_kl(emulator, full, batches), middle_mse(emulator, full, map8, batches)
    seen = []
    losses = distill_middle(emulator, full, map8, batches, steps=20, lr=3e-3, objective=objective, on_step=lambda step, loss: seen.append(step))
    after, mse_after = output_kl(emulator, full, batches), middle_mse(emulator, full, map8, batches)
    assert seen == list(range(1, 21)) and len(losses) == 20
    assert after < 0.7 * before, (before, after)
    if objective == "logits+hidden":  # the top adapter's input moves toward the backbone's too
        assert mse_after < 0.7 * mse_before, (mse_before, mse_after)
    adapters_after = adapter_state(emulator, map8)
    assert all(np.array_equal(adapters_before[k], adapters_after[k]) for k in adapters_before)
    assert trainable_blocks(emulator) == {"0", "1", "4", "5"}


def test_distilling_a_shared_emulator_trains_the_unique_blocks_and_keeps_them_shared(tiny8):
    from emulator.build import decoder_layers
    from emulator.layers import make_layer_map

    full, tokenizer = tiny8
    lm = make_layer_map(8, 2, 2, fill="share")
    emulator = build_emulator(full, lm)
    batches = text_batches(tokenizer, TEXTS, batch_size=8, max_length=32)
    before = middle_mse(emulator, full, lm, batches)
    distill_middle(emulator, full, lm, batches, steps=12, lr=3e-3, objective="hidden")
    assert middle_mse(emulator, full, lm, batches) < 0.7 * before
    layers = decoder_layers(emulator)
    assert layers[3].mlp.up_proj.weight is layers[2].mlp.up_proj.weight
    assert not torch.equal(layers[2].mlp.up_proj.weight, decoder_layers(full)[2].mlp.up_proj.weight)
    assert trainable_blocks(emulator) == {"0", "1", "6", "7"}


def test_bad_objective_quantized_or_empty_input_is_refused(tiny8, map8):
    full, tokenizer = tiny8
    emulator = build_emulator(full, map8)
    batches = text_batches(tokenizer, TEXTS[:4])
    with pytest.raises(ValueError, match="objective must be one of logits, hidden, logits\\+hidden"):
        distill_middle(emulator, full, map8, batches, objective="mse")
    with pytest.raises(ValueError, match="at least one batch"):
        distill_middle(emulator, full, map8, [], steps=3)
    quantized = build_emulator(full, map8, quantize="int8")
    with pytest.raises(ValueError, match="distil before quantizing"):
        distill_middle(quantized, full, map8, batches, steps=1)


def test_shared_prompt_prefix_is_scored_once_per_row():
    ids = torch.tensor([[5, 6, 7, 1, 2, 0], [5, 6, 7, 3, 0, 0], [5, 6, 7, 4, 4, 4]])
    mask = (torch.arange(6) < torch.tensor([[5], [4], [6]])).long()
    scored = _scored_positions(ids, mask)
    # positions 0-1 predict shared tokens; position 2 predicts the first differing token
    assert scored.tolist() == [
        [False, False, True, True, True, False],
        [False, False, True, True, False, False],
        [False, False, True, True, True, True],
    ]
    assert _scored_positions(ids[:1], mask[:1]).tolist() == [mask[0].bool().tolist()]


def test_distillation_batches_are_chat_examples_from_a_file_or_the_builtin_families(tiny8, tmp_path):
    tokenizer = tiny8[1]
    builtin = distillation_batches(tokenizer)
    assert sum(len(b["input_ids"]) for b in builtin) == 6 * 32 and set(builtin[0]) == {"input_ids", "attention_mask"}
    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": "Say it.", "input": str(i), "output": "ok"}) for i in range(10)))
    own = distillation_batches(tokenizer, str(data))
    assert [len(b["input_ids"]) for b in own] == [8, 2]
    one = example_batches(tokenizer, [Example("Say it.", "7", "ok")])[0]
    assert one["input_ids"][0].tolist() == encode_example(tokenizer, Example("Say it.", "7", "ok"), 128)["input_ids"]
    with pytest.raises(DataError, match="missing.jsonl"):
        distillation_batches(tokenizer, str(tmp_path / "missing.jsonl"))


def test_held_out_batches_keep_an_emulator_that_already_matches_unchanged(tiny8):
    """Nothing dropped: the loss starts at 0, and AdamW's steps on rounding noise would only push
    the emulator away from the backbone. With held-out batches the start is kept; without, it drifts."""
    from emulator.layers import make_layer_map

    full, tokenizer = tiny8
    lm = make_layer_map(8, 2, 2, "drop", 1.0)
    assert not lm.dropped()
    batches = text_batches(tokenizer, TEXTS, batch_size=4, max_length=32)
    kept, drifted = build_emulator(full, lm), build_emulator(full, lm)
    scores = []
    distill_middle(kept, full, lm, batches[:2], steps=10, lr=3e-2, held=batches[2:], on_held=lambda step, loss: scores.append(step))
    distill_middle(drifted, full, lm, batches[:2], steps=10, lr=3e-2)
    assert scores == list(range(11))
    assert output_kl(kept, full, batches) < 1e-9
    assert output_kl(drifted, full, batches) > 1e-4


def test_held_out_batches_keep_the_best_step_when_later_steps_get_worse(tiny8, map8):
    full, tokenizer = tiny8
    batches = text_batches(tokenizer, TEXTS, batch_size=4, max_length=32)
    emulator = build_emulator(full, map8)
    from emulator.distill import HeldScores

    held = HeldScores()
    distill_middle(emulator, full, map8, batches[:2], steps=10, lr=1.0, objective="hidden", held=batches[2:], on_held=held)
    scores = dict(held.scores)
    best = min(scores.values())
    assert scores[10] > 1.5 * best, scores  # the run got worse at the end: going back matters
    final = sum(middle_mse(emulator, full, map8, [b]) for b in batches[2:]) / 2  # unmasked: within padding's share
    assert final == pytest.approx(best, rel=1e-2) and final < scores[10] / 1.4
    summary = held.summary()
    assert summary["before"] == scores[0] and summary["kept"] == best and scores[summary["kept_step"]] == best


def test_held_scores_report_the_first_lowest_step_as_distill_middle_keeps_it():
    from emulator.distill import HeldScores

    assert HeldScores().summary() is None  # nothing held out
    held = HeldScores()
    for step, loss in ((0, 2.0), (1, 0.5), (2, 0.7), (3, 0.5)):
        held(step, loss)
    assert held.summary() == {"before": 2.0, "kept": 0.5, "kept_step": 1}


def test_split_held_leaves_enough_to_train_on():
    from emulator.distill import split_held

    assert split_held(list(range(10))) == (list(range(8)), [8, 9])
    assert split_held([0, 1, 2]) == ([0, 1, 2], [])
