"""Client-level (user-level) DP at the coordinator, as in DP-FedAvg.

McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models": clip each
client's delta from the global model to norm C, average the m clipped updates with equal
weights, add Gaussian noise N(0, (z*C/m)^2) to the mean. Flower ships the same recipe as
DifferentialPrivacyServerSideFixedClipping; this module is its math on named numpy arrays.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): move C geometrically toward the `target_quantile` of client update norms, from
the (noised) fraction of clients that were clipped, as Flower's adaptive-clipping wrappers do.

Noise: every Gaussian draw here (the update noise and the adaptive clipping's count noise)
comes from the OS CSPRNG (`os.urandom`) through the Box-Muller transform, so it has no seed and
no state that a checkpoint could save or a reader of one could replay. Tests may pass a seeded
`np.random.Generator` instead (anything with `.normal(loc, scale, size)`).

Accounting: each round is one sampled Gaussian mechanism with client sampling rate
q = clients per round / total clients, so the user-level epsilon after T rounds comes from
Opacus' RDP analysis (`opacus.accountants.analysis.rdp`), imported lazily so that importing
this module stays numpy-only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from aggregation.validate import global_l2_norm

NamedArrays = Mapping[str, np.ndarray]

# Secure normals are drawn in chunks of this many, so temporaries stay small for any array size.
_CHUNK = 1 << 20


class NormalSource(Protocol):
    """What the noise is drawn from: `SecureGaussian` (default) or, in tests, `np.random.Generator`."""

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None) -> np.ndarray | float: ...


def secure_standard_normal(count: int) -> np.ndarray:
    """`count` independent N(0, 1) float64 samples from the OS CSPRNG (Box-Muller on 53-bit uniforms).

    Each pair of normals takes two uniforms from 16 bytes of `os.urandom`: u1 in (0, 1] (so the
    log is finite; |z| <= 8.57) and u2 in [0, 1). No rejection loop, no state.
    """
    if count < 0:
        raise ValueError(f"secure_standard_normal: count must be >= 0, got {count}")
    out = np.empty(count, dtype=np.float64)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        half = (n + 1) // 2
        bits = np.frombuffer(os.urandom(16 * half), dtype=np.uint64) >> np.uint64(11)
        uniform = bits.astype(np.float64)
        uniform *= 2.0**-53
        radius = uniform[:half]
        radius += 2.0**-53  # (0, 1]
        np.log(radius, out=radius)
        radius *= -2.0
        np.sqrt(radius, out=radius)
        angle = uniform[half:]
        angle *= 2.0 * math.pi
        pair = out[start : start + n]
        first, second = pair[:half], pair[half:]
        np.multiply(radius, np.cos(angle), out=first)
        np.multiply(radius[: n - half], np.sin(angle[: n - half]), out=second)
    return out


class SecureGaussian:
    """Gaussian noise from the OS CSPRNG, with `np.random.Generator.normal`'s signature.

    It holds no state: nothing to seed, checkpoint or restore, and two processes (or a run and its
    resumption) never draw the same noise.
    """

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None) -> np.ndarray | float:
        shape = () if size is None else (size,) if isinstance(size, int) else tuple(size)
        sample = secure_standard_normal(math.prod(shape)).reshape(shape)
        sample *= scale
        sample += loc
        return float(sample) if size is None else sample

    def __repr__(self) -> str:
        return "SecureGaussian(os.urandom)"


def _source(rng: NormalSource | None) -> NormalSource:
    return SecureGaussian() if rng is None else rng


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
    aggregate: NamedArrays, noise_multiplier: float, clip_norm: float, num_clients: int, rng: NormalSource | None = None
) -> dict[str, np.ndarray]:
    """aggregate + N(0, (noise_multiplier * clip_norm / num_clients)^2) on every coordinate.

    `aggregate` must be the unweighted mean of `num_clients` updates clipped to `clip_norm`
    (an example-weighted mean has a different sensitivity). Dtypes are kept. The noise comes
    from the OS CSPRNG unless a test passes `rng`.
    """
    std = noise_std(noise_multiplier, clip_norm, num_clients)
    source = _source(rng)
    out = {}
    for key, value in aggregate.items():
        value = np.asarray(value)
        noised = value.astype(np.float64)
        if std > 0:
            noised += source.normal(0.0, std, size=value.shape)
        out[key] = noised.astype(value.dtype)
    return out


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


def noisy_fraction_clipped(num_clipped: int, num_clients: int, count_stddev: float, rng: NormalSource | None = None) -> float:
    """The clipped fraction with Gaussian noise on the count (Andrew et al. use sigma_b ~ m/20).

    The count noise is DP noise too (it protects who was clipped): from the OS CSPRNG unless a
    test passes `rng`.
    """
    if num_clients < 1:
        raise ValueError(f"adaptive clipping: num_clients must be >= 1, got {num_clients}")
    if count_stddev <= 0:
        return num_clipped / num_clients
    return float((num_clipped + float(_source(rng).normal(0.0, count_stddev))) / num_clients)


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
