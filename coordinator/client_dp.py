"""Client-level (user-level) DP at the coordinator: DP-FedAvg over the validated updates.

Each client's delta from the global adapter is clipped to `clip_norm`, the clipped updates are
averaged with equal weights (example weights would let one client's sensitivity grow), and
Gaussian noise N(0, (z*C/m)^2) is added to the mean. With adaptive clipping C follows a target
quantile of the update norms (Andrew et al. 2021). The math lives in `aggregation.user_dp`.

The noise (on the mean and on the clipped count) comes from the OS CSPRNG: there is no seed, and
the state a checkpoint keeps is only the clip bound and the rounds accounted, so a checkpoint
never lets anyone replay past noise. `rng` exists for tests that need reproducible noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregation.fedavg import weighted_mean
from aggregation.user_dp import (
    adaptive_clip_update,
    NormalSource,
    SecureGaussian,
    adaptive_noise_multiplier,
    add_gaussian_noise,
    clip_delta,
    noisy_fraction_clipped,
    user_level_epsilon,
)

NamedArrays = dict[str, np.ndarray]


@dataclass
class ClientLevelDP:
    noise_multiplier: float = 1.0
    clip_norm: float = 0.1
    delta: float = 1e-5
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float = 0.0  # noise on the clipped count (adaptive only); 0 = m/20
    rounds: int = 0
    # Tests only: a seeded np.random.Generator for reproducible noise. None = the OS CSPRNG.
    rng: NormalSource | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rng is None:
            self.rng = SecureGaussian()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the (adaptive) clip bound and the rounds accounted; never noise state."""
        return {"clip_norm": self.clip_norm, "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of `state_dict`. An older checkpoint's `rng` entry (PCG64 state) is ignored."""
        self.clip_norm, self.rounds = float(state["clip_norm"]), int(state["rounds"])

    def __call__(self, current: NamedArrays, updates: Sequence[NamedArrays], sample_rate: float) -> tuple[NamedArrays, dict]:
        """The noised mean of clipped updates, and the ledger entry for this round."""
        m = len(updates)
        clip_used = self.clip_norm
        clipped, flags = zip(*(clip_delta(u, current, clip_used) for u in updates))
        z = self.noise_multiplier
        if self.adaptive:
            count_stddev = self.count_stddev or m / 20
            z = adaptive_noise_multiplier(self.noise_multiplier, count_stddev)
            fraction = noisy_fraction_clipped(sum(flags), m, count_stddev, self.rng)
            self.clip_norm = adaptive_clip_update(self.clip_norm, fraction, self.target_quantile, self.clip_lr)
        mean = weighted_mean(list(clipped), [1.0] * m)
        return self.release(current, mean, m, sample_rate, noise_multiplier=z, clip_norm=clip_used, clipped=int(sum(flags)))

    def release(
        self,
        current: NamedArrays,
        mean: NamedArrays,
        num_clients: int,
        sample_rate: float,
        *,
        noise_multiplier: float | None = None,
        clip_norm: float | None = None,
        clipped: int | None = None,
    ) -> tuple[NamedArrays, dict]:
        """Noise the equal-weight mean of `num_clients` updates already clipped to the bound; account the round.

        Under secure aggregation the clients clip their own updates and the coordinator only
        has this mean (so `clipped` is unknown: None in the ledger).
        """
        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        clip_used = self.clip_norm if clip_norm is None else clip_norm
        noised = add_gaussian_noise(mean, z, clip_used, num_clients, self.rng)
        self.rounds += 1
        entry = {
            "mechanism": "client-dp",
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": clip_used,
            "clipped": clipped,
            "sample_rate": sample_rate,
            "steps": self.rounds,
            "delta": self.delta,
            "epsilon": user_level_epsilon(self.noise_multiplier, sample_rate, self.rounds, self.delta),
            "accountant": "rdp",
        }
        return {k: v.astype(current[k].dtype) for k, v in noised.items()}, entry
