"""The coordinator's aggregation step: one rule from `aggregation/`, selected by name.

Holds the only state a rule needs across rounds (the server optimizer's moments), and tells
clients which LoRA factors to train, since FFA-LoRA and RoLoRA freeze one of them. FedEx-LoRA
and FLoRA also change the frozen base weights: their part beyond the rank-r factors travels
as dense `base/` arrays in the global record (finetune/base_delta.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from aggregation import server_opt
from aggregation.fedavg import weighted_mean
from aggregation.hetero_rank import flora_stack, hetlora
from aggregation.lora import factor_keys, fedex_lora, ffa_lora, product, rolora, rolora_trainable
from aggregation.robust import coordinate_median, trimmed_mean
from aggregation.rules import get_rule
from finetune.base_delta import add_to_base, join_base, split_base
from finetune.choices import BASE_RULES

NamedArrays = dict[str, np.ndarray]


def train_factors(rule: str, server_round: int) -> str:
    """Which LoRA factors clients train this round: "AB", or only "A"/"B"."""
    if rule == "ffa-lora":
        return "B"
    if rule == "rolora":
        return rolora_trainable(server_round)
    return "AB"


@dataclass
class Aggregator:
    rule: str = "fedavg"
    server_lr: float = 0.01  # eta of FedAdam / FedYogi
    server_momentum: float = 0.9  # FedAvgM
    trim_fraction: float = 0.1  # trimmed mean: share cut from each side
    lora_scaling: float = 2.0  # PEFT's alpha / r: the products FedEx-LoRA and FLoRA fold into the base
    state: server_opt.ServerOptState | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        get_rule(self.rule)  # one-line ValueError for an unknown name

    def __call__(self, current: NamedArrays, updates: Sequence[NamedArrays], weights: Sequence[float], server_round: int) -> NamedArrays:
        """The new global arrays from validated client updates (trained arrays, not deltas)."""
        spec = get_rule(self.rule)
        if spec.server_optimizer:
            mean = weighted_mean(updates, weights)
            new, self.state = server_opt.apply(spec.server_optimizer, current, mean, self.state, **self._hparams(spec.server_optimizer))
            return {k: v.astype(current[k].dtype) for k, v in new.items()}
        if self.rule == "ffa-lora":
            return ffa_lora(updates, weights)
        if self.rule == "rolora":
            return rolora(updates, weights, server_round, current)
        if self.rule in BASE_RULES:
            return self._fold_into_base(current, updates, weights)
        if self.rule == "hetlora":
            return hetlora(updates, weights)
        if self.rule == "median":
            return coordinate_median(updates)
        if self.rule == "trimmed-mean":
            return trimmed_mean(updates, self.trim_fraction)
        return weighted_mean(updates, weights)  # fedavg, fedprox (its proximal term is client-side)

    def _fold_into_base(self, current: NamedArrays, updates: Sequence[NamedArrays], weights: Sequence[float]) -> NamedArrays:
        """FedEx-LoRA: averaged factors + the exact residual into the base. FLoRA: the whole
        stacked product into the base, and clients restart from B = 0 (A kept as it was)."""
        lora, base = split_base(current)
        if self.rule == "fedex-lora":
            factors, residual = fedex_lora(updates, weights, scaling=self.lora_scaling)
            return join_base({k: v.astype(lora[k].dtype) for k, v in factors.items()}, add_to_base(base, residual))
        stacked = flora_stack(updates, weights, scalings=[self.lora_scaling] * len(updates))
        b_keys = set(factor_keys(lora, "B"))
        fresh = {k: (np.zeros_like(v) if k in b_keys else v) for k, v in lora.items()}
        return join_base(fresh, add_to_base(base, product(stacked)))

    def _hparams(self, optimizer: str) -> dict:
        if optimizer == "fedavgm":
            return {"server_momentum": self.server_momentum}
        return {"eta": self.server_lr}
