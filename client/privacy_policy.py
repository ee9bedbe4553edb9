"""The device's own privacy policy: what a round message may ask of it, and what it may spend.

A device that runs `fedsite client --dp-min-noise Z --epsilon-budget E --delta D` puts its
policy into its node config, which the coordinator cannot change. Whatever a round message
says, the device then trains only with local DP-SGD (Opacus) at a noise multiplier of at least
Z, accounts at a delta of at most D, and declines a round that would take its cumulative epsilon
(kept on its own disk, client/state.py) past E. A round may ask for more privacy, never less.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the edge launcher imports this module: keep it free of torch and peft
    from finetune.config import FedsiteConfig

MIN_NOISE_KEY, BUDGET_KEY, DELTA_KEY = "dp-min-noise", "dp-epsilon-budget", "dp-delta"
LEDGER_KEY = "privacy-ledger"  # node config: the device's accountant file (fedsite client sets it)


class PolicyRefusal(RuntimeError):
    """The round asks this device for less privacy than its policy allows."""


def _number(node_config: Mapping[str, object], key: str) -> float:
    value = node_config.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"node config {key} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DevicePolicy:
    min_noise: float = 0.0  # smallest DP-SGD noise multiplier the device trains with (0 = no DP required)
    epsilon_budget: float = 0.0  # cumulative epsilon the device may spend, over all runs (0 = none)
    delta: float = 0.0  # largest delta it accounts at (0 = the round's)

    def __post_init__(self) -> None:
        if self.delta >= 1:
            raise ValueError(f"dp-delta must be below 1, got {self.delta}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> DevicePolicy:
        return cls(_number(node_config, MIN_NOISE_KEY), _number(node_config, BUDGET_KEY), _number(node_config, DELTA_KEY))

    @property
    def active(self) -> bool:
        return self.min_noise > 0 or self.epsilon_budget > 0 or self.delta > 0

    def node_config(self) -> dict[str, float]:
        """The node-config entries of this policy (none when inactive)."""
        return {MIN_NOISE_KEY: self.min_noise, BUDGET_KEY: self.epsilon_budget, DELTA_KEY: self.delta} if self.active else {}

    def admit(self, config: FedsiteConfig) -> None:
        """Raise PolicyRefusal unless the round trains with local DP (the only DP the device controls)."""
        if self.active and config.dp != "local":
            what = "no DP" if config.dp == "none" else "DP added by the coordinator only"
            raise PolicyRefusal(f"this device trains only with local DP (its policy: noise >= {self.min_noise:g}, epsilon budget {self.epsilon_budget:g}); the round asks for {what}")

    def delta_for(self, round_delta: float) -> float:
        return min(round_delta, self.delta) if self.delta > 0 else round_delta

    def check(self, noise_multiplier: float, epsilon_after: float) -> None:
        """Raise PolicyRefusal when the planned round uses too little noise or would overspend."""
        if noise_multiplier < self.min_noise:
            raise PolicyRefusal(f"the round's DP-SGD noise multiplier {noise_multiplier:.4g} is below this device's minimum {self.min_noise:g}")
        if self.epsilon_budget > 0 and not epsilon_after <= self.epsilon_budget:
            raise PolicyRefusal(f"the round would bring this device's epsilon to {epsilon_after:.4g}, past its budget {self.epsilon_budget:g}")
