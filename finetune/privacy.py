"""Sample-level DP-SGD on a client (Opacus), with a privacy ledger that survives rounds.

`train_private` is the DP twin of `finetune.train.train`: Poisson-sampled batches
(sample rate q = batch_size / n, the sampler of Opacus' DPDataLoader), per-sample gradients of the LoRA
parameters only (Opacus hooks), per-sample clipping to `max_grad_norm`, Gaussian noise, AdamW.
Each call spends budget through an Opacus accountant whose history is returned as a plain
JSON-able dict; pass it back next round and epsilon keeps accumulating. The model is hooked
only while training: afterwards it is the same plain PEFT model, so a cached model can serve
the next client.
"""

from __future__ import annotations

import math
import secrets
import time
import types
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aggregation.user_dp import secure_standard_normal
from finetune.batches import collate, encode_example
from finetune.examples import Example
from finetune.flops import batch_tokens, token_flops
from finetune.loss import token_losses
from finetune.train import NoGradient, TrainResult, TrainSettings, check_gradients

ACCOUNTANTS = ("rdp", "prv", "gdp")
MECHANISM = "local-dp-sgd"
# Opacus leaves these on parameters (optimizer) and modules (hooks); a reused model must not keep them.
_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
_MODULE_ATTRS = ("activations", "max_batch_len")


class BudgetExhausted(RuntimeError):
    """The client's privacy budget is spent; it must decline further training."""


@dataclass(frozen=True)
class DPSettings:
    """Per-sample DP-SGD: give exactly one of `noise_multiplier` or `target_epsilon`.

    With `target_epsilon` the noise is calibrated once, for the client's whole expected
    participation (`total_steps_budget` of `train_private`), and kept in the ledger state.
    `seed` fixes sampling and noise (tests only). With None (every real client) the Poisson
    sampling draws a fresh seed from OS entropy every call, and the Gaussian noise comes from
    the OS CSPRNG itself (`secure_noise`): no generator state exists that could be saved or
    replayed.
    """

    noise_multiplier: float | None = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "dp: set exactly one of noise_multiplier or target_epsilon "
                f"(got noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon}); "
                "use noise_multiplier=None with a target_epsilon"
            )
        if self.noise_multiplier is not None and not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"dp: noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"dp: target_epsilon must be > 0, got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp: delta must be in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"dp: max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"dp: accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")


@dataclass(frozen=True)
class PrivacySpend:
    """What one round of local DP-SGD cost; `epsilon` is cumulative over all of the client's rounds."""

    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int  # this round
    total_steps: int  # all rounds so far
    delta: float
    epsilon: float
    accountant: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ ledger


def _history(state: dict | None, accountant: str) -> list[tuple[float, float, int]]:
    if not state:
        return []
    mechanism = state.get("mechanism", accountant)
    if mechanism != accountant:
        raise ValueError(f"dp: accountant state was kept with '{mechanism}', but this run uses '{accountant}'")
    return [(float(z), float(q), int(s)) for z, q, s in state.get("history", [])]


def epsilon_for(history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a ledger history [(noise_multiplier, sample_rate, steps), ...], from a fresh accountant."""
    if not history:
        return 0.0
    if any(float(z) == 0 and int(s) > 0 for z, _, s in history):
        return math.inf  # a noiseless step is not private at all
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(z), float(q), int(s)) for z, q, s in history]
    return float(acc.get_epsilon(delta=delta))


def spent_epsilon(accountant_state: dict | None, dp: DPSettings) -> float:
    return epsilon_for(_history(accountant_state, dp.accountant), dp.delta, dp.accountant)


def check_budget(accountant_state: dict | None, dp: DPSettings, target_epsilon_budget: float | None = None) -> float:
    """Raise BudgetExhausted when the spent epsilon already reached the budget; else return it.

    The budget defaults to `dp.target_epsilon`; with neither, there is no budget to check.
    """
    spent = spent_epsilon(accountant_state, dp)
    budget = dp.target_epsilon if target_epsilon_budget is None else target_epsilon_budget
    if budget is not None and spent >= budget:
        steps = sum(s for _, _, s in _history(accountant_state, dp.accountant))
        raise BudgetExhausted(
            f"privacy budget exhausted: spent epsilon {spent:.3f} >= budget {budget:g} "
            f"(delta={dp.delta:g}, {steps} DP-SGD steps so far); declining to train"
        )
    return spent


def plan_round(accountant_state: dict | None, dp: DPSettings, num_examples: int, settings: TrainSettings, total_steps_budget: int | None = None) -> PrivacySpend:
    """What `train_private` will spend on `num_examples` examples, before it trains: its noise,
    sample rate and steps, and the cumulative epsilon after the round. A device checks this
    against its own policy and budget and declines before anything is spent."""
    if num_examples <= 0:
        raise ValueError("no training examples: this client's data partition is empty")
    sample_rate = min(1.0, settings.batch_size / num_examples)
    steps = settings.num_steps(num_examples)
    noise = _noise(dp, accountant_state, sample_rate, total_steps_budget or steps)
    history = [*_history(accountant_state, dp.accountant), (noise, sample_rate, steps)]
    return PrivacySpend(
        mechanism=MECHANISM, noise_multiplier=noise, sample_rate=sample_rate, steps=steps,
        total_steps=sum(s for _, _, s in history), delta=dp.delta, epsilon=epsilon_for(history, dp.delta, dp.accountant),
        accountant=dp.accountant,
    )


def _noise(dp: DPSettings, state: dict | None, sample_rate: float, planned_steps: int) -> float:
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    if state and state.get("target_epsilon") == dp.target_epsilon and "noise_multiplier" in state:
        return float(state["noise_multiplier"])  # calibrated in an earlier round: keep it
    # What make_private_with_epsilon does, but for steps (the whole participation), not epochs.
    return float(get_noise_multiplier(
        target_epsilon=dp.target_epsilon, target_delta=dp.delta, sample_rate=sample_rate,
        steps=planned_steps, accountant=dp.accountant,
    ))


# ------------------------------------------------------------------ training


def secure_noise(reference: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std^2) noise shaped like `reference`, from the OS CSPRNG.

    As Opacus' `secure_mode`, each entry is the sum of four standard normals halved (Holohan &
    Braghin 2021), against attacks on the floating-point representation of a single Gaussian
    sample; Opacus' own secure mode needs `torchcsprng`, which is not built for this torch.
    """
    if std == 0:
        return torch.zeros_like(reference)
    draws = secure_standard_normal(4 * reference.numel()).reshape(4, -1).sum(0) / 2
    return (torch.from_numpy(draws).to(reference.dtype) * std).view(reference.shape).to(reference.device)


def _add_secure_noise(optimizer: Any) -> None:
    """Opacus' `DPOptimizer.add_noise`, with the noise from `secure_noise` instead of a torch generator."""
    std = optimizer.noise_multiplier * optimizer.max_grad_norm
    for p in optimizer.params:
        _check_processed_flag(p.summed_grad)
        p.grad = (p.summed_grad + secure_noise(p.summed_grad, std)).view_as(p)
        _mark_as_processed(p.summed_grad)


def _per_example_mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the batch of each example's mean response-token loss.

    HF's built-in loss averages over all tokens of the batch, which couples examples; DP-SGD
    needs a sum (here: mean, Opacus' loss_reduction="mean") of independent per-example losses.
    """
    tokens, mask = token_losses(model, batch)
    return ((tokens * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def _strip_opacus(model: torch.nn.Module) -> None:
    """Remove every Opacus trace, also when make_private failed halfway (hooks already attached)."""
    for handle in getattr(model, "autograd_grad_sample_hooks", []):
        handle.remove()
    if hasattr(model, "autograd_grad_sample_hooks"):
        del model.autograd_grad_sample_hooks
    for p in model.parameters():
        for attr in _PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None
    for module in model.modules():
        for attr in _MODULE_ATTRS:
            if hasattr(module, attr):
                delattr(module, attr)


def _first_backward(loss: torch.Tensor, named: list[tuple[str, torch.nn.Parameter]]) -> None:
    """The first DP backward, checked: Opacus' per-sample hooks fail with an AttributeError when no
    gradient reaches a LoRA module (its grad_output is None); that, too, is a NoGradient."""
    try:
        loss.backward()
    except AttributeError as err:
        if any(p.grad is not None for _, p in named):
            raise
        raise NoGradient(f"train_private: no gradient reached the LoRA modules (Opacus: {err})") from err
    check_gradients(named)


def _dp_steps(
    model: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]], encoded: list[dict], pad_id: int,
    sampler: UniformWithReplacementSampler, optimizer: Any,
) -> tuple[list[float], int]:
    """One DP-SGD step per Poisson draw of the sampler; returns the loss of each non-empty batch
    and the token positions computed (finetune/flops.py).

    The first non-empty batch's gradients are checked before any noise is added (NoGradient).
    """
    params = [p for _, p in named]
    losses: list[float] = []
    tokens = 0
    for step, indices in enumerate(sampler):
        optimizer.zero_grad(set_to_none=True)
        if not indices:
            # Poisson sampling drew nobody: still a DP step (noise only), and still accounted.
            for p in params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        else:
            batch = collate([encoded[i] for i in indices], pad_id)
            tokens += batch_tokens(batch)
            loss = _per_example_mean_loss(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"train_private: loss became {loss.item()} at step {step + 1}; lower the learning rate")
            if not loss.requires_grad:
                raise NoGradient("train_private: the loss does not depend on any trainable parameter (no gradient can flow)")
            if losses:
                loss.backward()
            else:
                _first_backward(loss, named)
            losses.append(loss.item())
        optimizer.step()
    return losses, tokens


def train_private(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    settings: TrainSettings,
    dp: DPSettings,
    accountant_state: dict | None,
    total_steps_budget: int | None = None,
) -> tuple[TrainResult, PrivacySpend, dict]:
    """Train the LoRA parameters with DP-SGD for `settings.num_steps(n)` Poisson-sampled steps.

    `accountant_state` is what the previous call returned (None on the first round).
    `total_steps_budget` is the client's expected total DP steps over all rounds; with a
    `target_epsilon` the noise is calibrated so that many steps stay within it (default: this
    round's steps). Returns (result, spend, new_state); `settings.max_grad_norm` is not used,
    clipping is per sample at `dp.max_grad_norm`.
    """
    started = time.perf_counter()
    encoded = [encode_example(tokenizer, ex, settings.max_seq_len) for ex in examples]
    n = len(encoded)
    plan = plan_round(accountant_state, dp, n, settings, total_steps_budget)
    sample_rate, steps, noise_multiplier = plan.sample_rate, plan.steps, plan.noise_multiplier
    history = _history(accountant_state, dp.accountant)

    named_params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named_params]
    if not params:
        raise ValueError("train_private: the model has no trainable parameters")
    names = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    if names:
        raise ValueError(f"train_private: only LoRA parameters may require grad, but {names[0]} does ({len(names)} such)")

    seed = dp.seed if dp.seed is not None else secrets.randbits(62)
    sampling_rng = torch.Generator().manual_seed(seed)  # the sampler draws on the CPU
    noise_rng = torch.Generator(device=params[0].device).manual_seed(seed + 1)  # Opacus draws noise where the gradients are
    with warnings.catch_warnings():  # Opacus' secure_mode needs torchcsprng; the noise is secure_noise instead
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=dp.accountant)
    if history:
        engine.accountant.load_state_dict({"history": list(history), "mechanism": dp.accountant})

    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    hooks = None
    with warnings.catch_warnings():
        # Frozen inputs to the first LoRA layer make torch note that hooks see output grads only: expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            model.train()  # Opacus refuses eval mode; its hooks only record in training mode
            hooks, dp_optimizer, _ = engine.make_private(
                module=model, optimizer=optimizer,
                data_loader=DataLoader(encoded, batch_size=settings.batch_size),  # only read for its length
                noise_multiplier=noise_multiplier, max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True, noise_generator=noise_rng, wrap_model=False,
            )
            # make_private derives q = 1/len(loader) = 1/ceil(n/B); use exactly q = B/n instead,
            # for the sampler, the mean's denominator and the accountant alike. The sampler is
            # the one inside Opacus' DPDataLoader, used bare because that loader's empty-batch
            # collation cannot rebuild dict batches when the very first draw is empty.
            if dp.seed is None:
                dp_optimizer.add_noise = types.MethodType(_add_secure_noise, dp_optimizer)
            sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate, generator=sampling_rng, steps=steps)
            dp_optimizer.expected_batch_size = sample_rate * n
            dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
            per_token = token_flops(model).total  # before Opacus' hooks come off; they add no parameters
            losses, tokens = _dp_steps(model, named_params, encoded, tokenizer.pad_token_id, sampler, dp_optimizer)
        finally:
            if hooks is not None:
                hooks.cleanup()
            _strip_opacus(model)
            model.eval()

    new_history = engine.accountant.history
    epsilon = epsilon_for(new_history, dp.delta, dp.accountant)
    state: dict[str, Any] = {"mechanism": dp.accountant, "history": [[float(z), float(q), int(s)] for z, q, s in new_history]}
    if dp.target_epsilon is not None:
        state.update(target_epsilon=dp.target_epsilon, noise_multiplier=noise_multiplier)
    tail = losses[-max(1, len(losses) // 4):]
    result = TrainResult(
        steps=steps,
        examples=n,
        loss=sum(losses) / len(losses) if losses else float("nan"),
        final_loss=sum(tail) / len(tail) if tail else float("nan"),
        seconds=time.perf_counter() - started,
        flops=per_token * tokens,
    )
    spend = PrivacySpend(
        mechanism=MECHANISM, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
        total_steps=sum(s for _, _, s in new_history), delta=dp.delta, epsilon=epsilon, accountant=dp.accountant,
    )
    return result, spend, state
