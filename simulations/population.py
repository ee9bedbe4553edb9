"""A client population: which device each simulated client is, and what happens to it each round.

Everything is a pure, seeded function of the experiment, so the coordinator (which learns a
node's partition id once) and a re-run agree on every client without storing per-client
state: profile counts follow the shares exactly (largest remainder) and are dealt to partition
ids by a seeded shuffle; availability and dropout are drawn per (seed, round, client).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from protos.profile import DeviceProfile

SHARE_TOLERANCE = 1e-6


def profile_from_mapping(values: Mapping[str, Any], index: int = 0) -> DeviceProfile:
    """A profile from a `[[profiles]]` table (kebab- or snake-case keys); unknown keys are errors."""
    known = {f.name: f for f in fields(DeviceProfile)}
    name = str(values.get("name", f"profile-{index}"))
    kwargs: dict[str, Any] = {"name": name}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            raise ValueError(f"profile '{name}': unknown key '{raw_key}' (expected {', '.join(f.name.replace('_', '-') for f in fields(DeviceProfile))})")
        default = getattr(DeviceProfile("x"), key)
        if isinstance(default, bool) != isinstance(value, bool) or (isinstance(default, (int, float)) and not isinstance(value, (int, float))):
            raise ValueError(f"profile '{name}': {raw_key} = {value!r} is not a {type(default).__name__}")
        kwargs[key] = type(default)(value) if not isinstance(default, bool) else value
    return DeviceProfile(**kwargs).validate()


def profile_counts(shares: Sequence[float], clients: int) -> list[int]:
    """Clients per profile: floor of share x clients, the remainder to the largest fractions."""
    raw = np.asarray(shares, dtype=float) * clients
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: clients - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


@dataclass(frozen=True)
class Population:
    """`clients` simulated clients drawn from `profiles`; implements coordinator.planner.PopulationModel."""

    profiles: tuple[DeviceProfile, ...]
    clients: int
    seed: int = 0
    deadline: float = 0.0  # simulated seconds a round waits for clients; 0 = no deadline
    upload_seconds: float = 5.0  # adaptive codec: most precise one whose upload takes at most this
    _assignment: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.profiles:
            raise ValueError("population: at least one [[profiles]] table is needed")
        if self.clients < 1:
            raise ValueError(f"population: clients = {self.clients} must be at least 1")
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"population: profile names must be unique, got {names}")
        total = sum(p.share for p in self.profiles)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"population: profile shares must sum to 1, got {total:g} ({', '.join(f'{p.name}={p.share:g}' for p in self.profiles)})")
        if self.deadline < 0 or self.upload_seconds <= 0:
            raise ValueError(f"population: deadline ({self.deadline}) must be >= 0 and upload-seconds ({self.upload_seconds}) > 0")
        counts = profile_counts([p.share for p in self.profiles], self.clients)
        order = np.repeat(np.arange(len(self.profiles), dtype=np.int16), counts)
        object.__setattr__(self, "_assignment", np.random.default_rng([self.seed, 0]).permutation(order))

    @property
    def profiles_by_name(self) -> dict[str, DeviceProfile]:
        return {p.name: p for p in self.profiles}

    def profile_of(self, partition_id: int) -> DeviceProfile:
        if not 0 <= partition_id < self.clients:
            raise ValueError(f"population: partition id {partition_id} outside 0..{self.clients - 1}; set the run's clients to the number of simulated nodes")
        return self.profiles[int(self._assignment[partition_id])]

    def counts(self) -> dict[str, int]:
        """Clients per profile name."""
        return {p.name: int((self._assignment == i).sum()) for i, p in enumerate(self.profiles)}

    def event(self, server_round: int, partition_id: int) -> str:
        """'unavailable', 'dropout' or 'train': independent draws per (seed, round, client)."""
        profile = self.profile_of(partition_id)
        reach, drop = np.random.default_rng([self.seed, 1, server_round, partition_id]).random(2)
        if reach >= profile.availability:
            return "unavailable"
        return "dropout" if drop < profile.dropout else "train"
