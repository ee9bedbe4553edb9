"""Client-level (user-level) DP at the coordinator, as in DP-FedAvg.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models": clip each
client's delta from the global model to norm C, average the m clipped updates with equal
weights, add Gaussian noise N(0, (z*C/m)^2) to the mean. Flower ships the same recipe as
DifferentialPrivacyServerSideFixedClipping; this module is its math on named numpy arrays.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): move C geometrically toward the `target_quantile` of client update norms, from
the (noised) fraction of clients that were clipped, as Flower's adaptive-clipping wrappers do.

Accounting: each round is one sampled Gaussian mechanism with client sampling rate
q = clients per round / total clients, so the user-level epsilon after T rounds comes from
Opacus' RDP analysis (`opacus.accountants.analysis.rdp`), imported lazily so that importing
this module stays numpy-only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from aggregation.validate import global_l2_norm

NamedArrays = Mapping[str, np.ndarray]

# The RDP orders Opacus' RDPAccountant uses (RDPAccountant.DEFAULT_ALPHAS).
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def clip_delta(update: NamedArrays, reference: NamedArrays, clip_norm: float) -> tuple[dict[str, np.ndarray], bool]:
    """Scale `update - reference` to L2 norm <= clip_norm (all keys as one vector).

    Returns (reference + clipped delta, was_clipped), in the update's dtypes. A client's
    weight in the mean is then bounded, which is what makes the noise below sufficient.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_delta: clip_norm must be > 0, got {clip_norm}")
    if set(update) != set(reference):
        odd = sorted(set(update) ^ set(reference))
        raise ValueError(f"clip_delta: update and reference keys differ ({odd[0]!r} and {len(odd) - 1} more)")
    norm = global_l2_norm(update, reference)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for key, value in update.items():
        ref = np.asarray(reference[key], dtype=np.float64)
        delta = np.asarray(value, dtype=np.float64) - ref
        out[key] = (ref + delta * scale).astype(np.asarray(value).dtype)
    return out, scale < 1.0


def noise_std(noise_multiplier: float, clip_norm: float, num_clients: int) -> float:
    """Standard deviation of the noise on the equal-weight mean of `num_clients` clipped updates."""
    if num_clients < 1:
        raise ValueError(f"user-level DP: num_clients must be >= 1, got {num_clients}")
    if noise_multiplier < 0 or clip_norm <= 0:
        raise ValueError(f"user-level DP: need noise_multiplier >= 0 and clip_norm > 0, got {noise_multiplier}, {clip_norm}")
    return noise_multiplier * clip_norm / num_clients


def add_gaussian_noise(
    aggregate: NamedArrays, noise_multiplier: float, clip_norm: float, num_clients: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """aggregate + N(0, (noise_multiplier * clip_norm / num_clients)^2) on every coordinate.

    `aggregate` must be the unweighted mean of `num_clients` updates clipped to `clip_norm`
    (an example-weighted mean has a different sensitivity). Dtypes are kept.
    """
    std = noise_std(noise_multiplier, clip_norm, num_clients)
    return {
        key: (np.asarray(value, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(value))).astype(np.asarray(value).dtype)
        for key, value in aggregate.items()
    }


def adaptive_clip_update(clip_norm: float, fraction_clipped: float, target_quantile: float, lr: float) -> float:
    """C * exp(-lr * (unclipped fraction - target_quantile)), Andrew et al.'s geometric update.

    When more clients than (1 - target_quantile) were clipped the bound grows, when fewer it
    shrinks, so C tracks the target quantile of update norms. Under DP pass the noised fraction
    (`noisy_fraction_clipped`).
    """
    if not 0 <= target_quantile <= 1:
        raise ValueError(f"adaptive clipping: target_quantile must be in [0, 1], got {target_quantile}")
    if clip_norm <= 0 or lr < 0:
        raise ValueError(f"adaptive clipping: need clip_norm > 0 and lr >= 0, got {clip_norm}, {lr}")
    unclipped = 1.0 - float(fraction_clipped)
    return float(clip_norm * math.exp(-lr * (unclipped - target_quantile)))


def noisy_fraction_clipped(num_clipped: int, num_clients: int, count_stddev: float, rng: np.random.Generator) -> float:
    """The clipped fraction with Gaussian noise on the count (Andrew et al. use sigma_b ~ m/20)."""
    if num_clients < 1:
        raise ValueError(f"adaptive clipping: num_clients must be >= 1, got {num_clients}")
    return float((num_clipped + rng.normal(0.0, count_stddev)) / num_clients) if count_stddev > 0 else num_clipped / num_clients


def adaptive_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Noise multiplier left for the update once the clipped count takes its share of the budget.

    Andrew et al., Thm. 1: z_delta = (z^-2 - (2 * sigma_b)^-2)^(-1/2), with sigma_b the noise
    std on the clipped count (sensitivity 1/2 after centring), so that update and count together
    cost as much as one Gaussian mechanism with multiplier z (the one to account).
    """
    if count_stddev <= 0:
        return noise_multiplier
    share = (2.0 * count_stddev) ** -2
    rest = noise_multiplier**-2 - share
    if rest <= 0:
        raise ValueError(
            f"adaptive clipping: count_stddev {count_stddev} takes the whole budget of noise_multiplier {noise_multiplier}; "
            "raise count_stddev or noise_multiplier"
        )
    return rest**-0.5


def user_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP of a user's whole contribution after `rounds` DP-FedAvg rounds.

    Each round is a sampled Gaussian mechanism: every client is in the round with probability
    `sample_rate` (clients per round / total clients), noise multiplier z on its clipped update.
    Composed with RDP and converted as Opacus' RDPAccountant does; inf without noise.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"user_level_epsilon: sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"user_level_epsilon: delta must be in (0, 1), got {delta}")
    if rounds < 0:
        raise ValueError(f"user_level_epsilon: rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=RDP_ORDERS)
    epsilon, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)
