import json

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from finetune.batches import collate, encode_example
from finetune.examples import Example
from finetune.lora import LoraSettings, attach_lora, get_lora_arrays, trainable_lora_parameters
import finetune.privacy as privacy
from finetune.privacy import (
    BudgetExhausted,
    DPSettings,
    PrivacySpend,
    _per_example_mean_loss,
    check_budget,
    epsilon_for,
    train_private,
)
from finetune.train import NoGradient, TrainSettings, train
from tests.finetune.test_train_eval import cut_gradients_at_the_last_norm

WORDS = ["abc", "dog", "tree", "sun", "moon", "star", "leaf", "rain"]
EXAMPLES = [Example("Reverse the word.", w, w[::-1], "reverse") for w in WORDS]



@pytest.fixture()
def lora_tiny(tiny):
    model, tokenizer = tiny
    return attach_lora(model, LoraSettings(rank=4)), tokenizer


def rdp_epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=sample_rate)
    return accountant.get_epsilon(delta=delta)


def test_settings_need_exactly_one_of_noise_or_target():
    with pytest.raises(ValueError, match="exactly one"):
        DPSettings(noise_multiplier=1.0, target_epsilon=3.0)
    with pytest.raises(ValueError, match="exactly one"):
        DPSettings(noise_multiplier=None)
    with pytest.raises(ValueError, match="accountant"):
        DPSettings(accountant="moments")
    assert DPSettings(noise_multiplier=None, target_epsilon=3.0).target_epsilon == 3.0


def test_epsilon_matches_opacus_and_accumulates_across_rounds(lora_tiny):
    model, tokenizer = lora_tiny
    settings = TrainSettings(steps=3, batch_size=4, lr=1e-2)  # q = 4 / 8
    dp = DPSettings(noise_multiplier=1.1, delta=1e-5, seed=0)
    result, spend, state = train_private(model, tokenizer, EXAMPLES, settings, dp, None)
    assert result.steps == 3 and result.examples == len(EXAMPLES) and np.isfinite(result.loss)
    assert (spend.mechanism, spend.sample_rate, spend.steps, spend.total_steps) == ("local-dp-sgd", 0.5, 3, 3)
    assert spend.epsilon == pytest.approx(rdp_epsilon(1.1, 0.5, 3, 1e-5), rel=1e-9)
    assert spend.epsilon == pytest.approx(epsilon_for(state["history"], 1e-5), rel=1e-9)

    state = json.loads(json.dumps(state))  # what the client persists between rounds
    _, second, state = train_private(model, tokenizer, EXAMPLES, settings, DPSettings(noise_multiplier=1.1, seed=1), state)
    assert (second.steps, second.total_steps) == (3, 6)
    assert second.epsilon == pytest.approx(rdp_epsilon(1.1, 0.5, 6, 1e-5), rel=1e-9)
    assert second.epsilon > spend.epsilon
    assert PrivacySpend(**second.to_dict()) == second


def test_update_is_the_mean_of_per_example_clipped_gradients(lora_tiny, monkeypatch):
    """With noise 0 and q = 1, the first step's gradient is exactly mean_i clip(g_i, C)."""
    model, tokenizer = lora_tiny
    examples = EXAMPLES[:4]
    params = trainable_lora_parameters(model)
    # B starts at zero, which zeroes A's gradient; give B a value so every LoRA weight has a gradient.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    clip = 1e-3
    expected = [torch.zeros_like(p) for p in params]
    model.train()
    for example in examples:
        batch = collate([encode_example(tokenizer, example, 128)], tokenizer.pad_token_id)
        grads = torch.autograd.grad(_per_example_mean_loss(model, batch), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        assert norm > 10 * clip  # so clipping is active
        for acc, g in zip(expected, grads):
            acc += g * min(1.0, clip / (norm.item() + 1e-6)) / len(examples)

    seen: list[list[torch.Tensor]] = []
    original = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([p.grad.detach().clone() for p in params])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=clip, seed=0)
    _, spend, _ = train_private(model, tokenizer, examples, TrainSettings(steps=2, batch_size=4), dp, None)
    assert spend.sample_rate == 1.0 and len(seen) == 2
    for got, want in zip(seen[0], expected):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-9)
    for step_grads in seen:
        assert torch.sqrt(sum((g**2).sum() for g in step_grads)) <= clip * (1 + 1e-4)


def test_model_is_plain_and_trained_afterwards(lora_tiny):
    model, tokenizer = lora_tiny
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    before = get_lora_arrays(model)
    train_private(model, tokenizer, EXAMPLES, TrainSettings(steps=2, batch_size=4), DPSettings(seed=0), None)
    assert type(model).__name__ == "PeftModelForCausalLM" and not model.training
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == hooks_before
    for p in model.parameters():
        assert not any(hasattr(p, a) for a in ("grad_sample", "summed_grad", "_forward_counter")) and p.grad is None
    assert not any(hasattr(m, "activations") for m in model.modules())
    after = get_lora_arrays(model)
    assert any(not np.array_equal(after[k], before[k]) for k in before)
    # The cached model serves the next (non-private) client as usual.
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
    assert np.isfinite(train(model, tokenizer, EXAMPLES, TrainSettings(steps=1, batch_size=4)).loss)


def test_empty_poisson_batches_still_step_and_count(lora_tiny, monkeypatch):
    model, tokenizer = lora_tiny
    many = [Example("Copy.", f"w{i}", f"w{i}") for i in range(40)]
    sizes: list[int] = []
    loss_fn = privacy._per_example_mean_loss

    def counting(model, batch):
        sizes.append(batch["input_ids"].shape[0])
        return loss_fn(model, batch)

    monkeypatch.setattr(privacy, "_per_example_mean_loss", counting)
    before = get_lora_arrays(model)
    settings = TrainSettings(steps=6, batch_size=1)  # q = 1/40: about a third of the draws are empty
    for seed in (5, 6):  # seed 5 draws nobody first (nothing to copy the batch layout from)
        _, spend, state = train_private(model, tokenizer, many, settings, DPSettings(seed=seed), None)
        assert spend.total_steps == 6 and state["history"] == [[1.0, 1 / 40, 6]]
    assert 0 < len(sizes) < 12 and all(s > 0 for s in sizes)
    after = get_lora_arrays(model)
    assert all(np.isfinite(v).all() for v in after.values()) and any(not np.array_equal(after[k], before[k]) for k in before)


def test_only_lora_may_be_trainable(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="only LoRA"):
        train_private(model, tokenizer, EXAMPLES, TrainSettings(steps=1), DPSettings(), None)


def test_exhausted_budget_declines_with_a_clear_reason():
    dp = DPSettings(noise_multiplier=1.0)
    state = {"mechanism": "rdp", "history": [[1.0, 0.5, 200]]}
    spent = epsilon_for(state["history"], dp.delta)
    with pytest.raises(BudgetExhausted, match=r"privacy budget exhausted: spent epsilon .* >= budget 5"):
        check_budget(state, dp, 5.0)
    assert check_budget(state, dp, spent + 1) == pytest.approx(spent)
    assert check_budget(None, dp, 5.0) == 0.0
    with pytest.raises(ValueError, match="'gdp'"):
        check_budget({"mechanism": "gdp", "history": []}, dp, 5.0)


def test_target_epsilon_holds_over_the_planned_participation(lora_tiny):
    model, tokenizer = lora_tiny
    dp = DPSettings(noise_multiplier=None, target_epsilon=2.0, seed=0)
    settings = TrainSettings(steps=3, batch_size=4)
    _, first, state = train_private(model, tokenizer, EXAMPLES, settings, dp, None, total_steps_budget=6)
    _, second, state = train_private(model, tokenizer, EXAMPLES, settings, dp, state, total_steps_budget=6)
    assert second.noise_multiplier == first.noise_multiplier > 0
    assert first.epsilon < second.epsilon <= 2.0
    assert second.epsilon > 1.9  # calibrated, not just "very noisy"
    assert second.epsilon == pytest.approx(rdp_epsilon(second.noise_multiplier, 0.5, 6, dp.delta), rel=1e-9)
    check_budget(state, dp)  # still within budget after the planned 6 steps


def test_dp_sgd_refuses_a_first_step_without_gradients_before_spending_budget(lora_tiny):
    model, tokenizer = lora_tiny
    handle = cut_gradients_at_the_last_norm(model, "drop")
    try:
        with pytest.raises(NoGradient, match="no gradient"):
            train_private(model, tokenizer, EXAMPLES, TrainSettings(steps=2, batch_size=4), DPSettings(seed=0), None)
    finally:
        handle.remove()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # the model is plain again


def test_secure_noise_has_the_right_scale_and_no_seed():
    reference = torch.zeros(200_000)
    a, b = privacy.secure_noise(reference, 2.0), privacy.secure_noise(reference, 2.0)
    assert abs(float(a.mean())) < 0.03 and abs(float(a.std()) - 2.0) < 0.03
    assert not torch.equal(a, b)  # no seed, no state: every draw is new
    assert torch.equal(privacy.secure_noise(reference, 0.0), reference)


def test_real_clients_draw_dp_sgd_noise_from_the_os_csprng(lora_tiny, monkeypatch):
    """seed=None (what clients use): the same data, sampling and model give different noise every
    call, and Opacus' torch generator never draws the noise."""
    model, tokenizer = lora_tiny
    calls = []
    real = privacy.secure_noise
    monkeypatch.setattr(privacy, "secure_noise", lambda ref, std: calls.append(std) or real(ref, std))
    start = get_lora_arrays(model)
    results = []
    for _ in range(2):
        from finetune.lora import set_lora_arrays

        set_lora_arrays(model, start)
        train_private(model, tokenizer, EXAMPLES, TrainSettings(steps=1, batch_size=8, lr=1e-2), DPSettings(noise_multiplier=1.0, max_grad_norm=1.0), None)
        results.append(get_lora_arrays(model))
    assert calls and all(std == 1.0 for std in calls)
    assert any(not np.array_equal(results[0][k], results[1][k]) for k in start)
