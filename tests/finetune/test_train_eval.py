import numpy as np
import pytest
import torch

from finetune.batches import IGNORE_INDEX, batch_stream, encode_example, format_prompt
from finetune.evaluate import evaluate, normalize_answer
from finetune.examples import Example
from finetune.lora import LoraSettings, attach_lora, get_lora_arrays
from finetune.train import NoGradient, TrainSettings, train

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXAMPLES = [Example("Reverse the word.", w, w[::-1], "reverse") for w in ["abc", "dog", "tree", "sun", "moon", "star"]]


def test_labels_cover_only_the_answer(tiny):
    _, tokenizer = tiny
    item = encode_example(tokenizer, EXAMPLES[0], max_len=128)
    prompt_len = len(tokenizer(format_prompt(tokenizer, EXAMPLES[0]), add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE_INDEX for label in item["labels"][:prompt_len])
    answer = [t for t in item["labels"] if t != IGNORE_INDEX]
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == "cba"


def test_long_prompts_are_cut_from_the_left(tiny):
    _, tokenizer = tiny
    long = Example("x" * 500, "", "keep", "t")
    item = encode_example(tokenizer, long, max_len=32)
    assert len(item["input_ids"]) == 32
    assert tokenizer.decode([t for t in item["labels"] if t != IGNORE_INDEX][:-1]) == "keep"


def test_batch_stream_is_deterministic_and_covers_each_epoch(tiny):
    _, tokenizer = tiny
    encoded = [encode_example(tokenizer, ex, 64) for ex in EXAMPLES]
    a = [next(s)["input_ids"] for s in [batch_stream(encoded, 3, 0, seed=1)] for _ in range(2)]
    stream = batch_stream(encoded, 3, 0, seed=1)
    b = [next(stream)["input_ids"] for _ in range(2)]
    assert torch.equal(a[0], b[0])
    seen = {tuple(row[row != 0].tolist()) for batch in b for row in batch}
    assert len(seen) == len(EXAMPLES)


def test_training_lowers_the_loss_and_changes_only_lora(tiny):
    model, tokenizer = tiny
    model = attach_lora(model, LoraSettings(rank=4, targets=ALL_LINEAR))
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora_before = get_lora_arrays(model)
    before = evaluate(model, tokenizer, EXAMPLES, max_new_tokens=4).loss
    result = train(model, tokenizer, EXAMPLES, TrainSettings(steps=60, batch_size=6, lr=3e-3))
    after = evaluate(model, tokenizer, EXAMPLES, max_new_tokens=4).loss
    assert result.steps == 60 and result.examples == len(EXAMPLES)
    assert after < before * 0.8
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, base_before[key]), key
    assert any(not np.array_equal(v, lora_before[k]) for k, v in get_lora_arrays(model).items())


def test_epochs_set_the_step_count():
    assert TrainSettings(epochs=2, batch_size=4).num_steps(10) == 6
    assert TrainSettings(steps=7).num_steps(10) == 7


def test_exact_match_scores_memorised_answers(tiny):
    model, tokenizer = tiny
    model = attach_lora(model, LoraSettings(rank=8, targets=ALL_LINEAR))
    data = EXAMPLES[:2]
    train(model, tokenizer, data, TrainSettings(steps=100, batch_size=2, lr=5e-3))
    result = evaluate(model, tokenizer, data, max_new_tokens=6)
    assert result.accuracy == 1.0, result.predictions
    assert result.per_task == {"reverse": 1.0}


def test_normalize_answer():
    assert normalize_answer("\n  42 \nmore") == "42"
    assert normalize_answer("   ") == ""


def test_proximal_term_keeps_the_update_closer_to_the_start(tiny):
    from finetune.backbone import build_tiny_llama

    distances = []
    for mu in (0.0, 50.0):
        model = attach_lora(build_tiny_llama(), LoraSettings(rank=4, targets=ALL_LINEAR))
        start = get_lora_arrays(model)
        train(model, tiny[1], EXAMPLES, TrainSettings(steps=15, batch_size=6, lr=1e-2, proximal_mu=mu))
        end = get_lora_arrays(model)
        distances.append(sum(float(np.sum((end[k] - start[k]) ** 2)) for k in start))
    assert distances[1] < distances[0] * 0.8


def test_offsite_proximal_term_is_zero_at_the_round_start_and_pulls_back_to_it(tiny):
    from emulator.build import build_emulator
    from emulator.layers import make_layer_map
    from emulator.offsite import get_offsite_arrays, trainable_model
    from finetune.backbone import build_tiny_llama
    from finetune.config import FedsiteConfig
    from finetune.train import proximal_term

    lam = 1.0
    mu = FedsiteConfig(offsite_proximal_mu=lam).client_proximal_mu("blocks")
    layer_map = make_layer_map(4, 1, 2, fill="share")
    emulator = trainable_model(build_emulator(build_tiny_llama(), layer_map), layer_map, "blocks", LoraSettings())
    params = [p for p in emulator.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params]
    assert float(proximal_term(params, anchors, mu)) == 0.0  # at the round start
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.01)
    term = proximal_term(params, anchors, mu)
    expected = lam * sum(float(((p - a) ** 2).sum()) for p, a in zip(params, anchors))
    assert float(term) == pytest.approx(expected, rel=1e-5)  # lambda ||adapter - start||^2
    term.backward()
    for p, a in zip(params, anchors):  # a gradient step moves every weight toward the start
        torch.testing.assert_close(p.grad, 2 * lam * (p.detach() - a))
        assert float(((p.detach() - 0.1 * p.grad - a) ** 2).sum()) < float(((p.detach() - a) ** 2).sum())
    start = get_offsite_arrays(emulator, layer_map, "blocks")
    distances = []
    for mu_run in (0.0, 2 * 50.0):
        model = trainable_model(build_emulator(build_tiny_llama(), layer_map), layer_map, "blocks", LoraSettings())
        train(model, tiny[1], EXAMPLES, TrainSettings(steps=8, batch_size=6, lr=1e-2, proximal_mu=mu_run))
        end = get_offsite_arrays(model, layer_map, "blocks")
        distances.append(sum(float(np.sum((end[k] - start[k]) ** 2)) for k in start))
    assert distances[1] < distances[0] * 0.8


class DropsGradient(torch.autograd.Function):
    """Identity forward, no gradient backward: what an op without an autograd formula does
    (bitsandbytes' inference-only 4-bit kernel through torch's autograd fallback)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def cut_gradients_at_the_last_norm(model, how: str):
    """A forward hook on the final norm that drops, detaches, zeroes or poisons (inf) what flows
    back through it: the ways a broken backbone fails."""
    norm = model.get_base_model().model.norm

    def hook(module, args, output):
        if how == "drop":
            return DropsGradient.apply(output)
        if how == "detach":
            return output.detach()
        if how == "zero":
            return output * 0
        out = output * 1
        out.register_hook(lambda g: g * float("inf"))
        return out

    return norm.register_forward_hook(hook)


@pytest.mark.parametrize("how, match", [
    ("drop", "no gradient for 16 of 16"), ("detach", "does not depend on any trainable"), ("zero", "all-zero gradient"), ("poison", "non-finite gradient"),
])
def test_a_first_step_without_a_usable_gradient_is_an_error(tiny, how, match):
    model, tokenizer = tiny
    model = attach_lora(model, LoraSettings(rank=2))
    handle = cut_gradients_at_the_last_norm(model, how)
    before = get_lora_arrays(model)
    with pytest.raises(NoGradient, match=match):
        train(model, tokenizer, EXAMPLES, TrainSettings(steps=3, batch_size=3))
    handle.remove()
    after = get_lora_arrays(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # refused before any step


def test_lora_a_may_get_a_zero_gradient_while_b_is_zero(tiny):
    model, tokenizer = tiny
    model = attach_lora(model, LoraSettings(rank=2))
    result = train(model, tokenizer, EXAMPLES, TrainSettings(steps=1, batch_size=3))  # B starts at 0: A's gradient is 0
    assert result.steps == 1
