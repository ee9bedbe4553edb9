"""Which clients train each round: Flower's uniform sample, or an energy-aware choice with a fairness bound.

`client-selection = "uniform"` keeps Flower's FedAvg sampling (`fraction-train` of the
connected nodes). `"energy-aware"` picks as many clients, preferring those whose battery is
above `selection-battery-threshold` (or who have none: mains power), then those whose round is
expected to emit the least carbon (profile watts / speed and per-MB costs times the grid's
carbon intensity; `selection-objective = "energy"`: the fewest joules), then those idle longest.
With `selection-fairness-weight` g > 0 the expected cost is weighed by (1 + times selected)^g,
so a cheap client grows dearer each time it trains and, left alone, clients train about
cost^(-1/g) as often as each other: g = 0 is pure greedy (the cheapest always win), larger g
spreads participation at the price of some energy. The fairness bound overrides preference: every
client is selected at least once every K = `selection-fairness-rounds` rounds. Earliest
deadline first decides how many must be taken now: if d_i is the last round client i may wait
until, the round takes the fewest earliest-deadline clients such that, for every window j < K,
the clients due by round t + j fit in the n slots of the rounds still to come
(count(d <= t + j) - n*j). With n*K >= N this never exceeds n; otherwise the round takes
more than n clients rather than break the bound.

Battery (clients whose profile has `battery-wh`): its start level and its idle recharge per
round are drawn from the run seed and the client (partition id when simulated), so reruns
agree; it drains by the energy the client spends (coordinator/energy.py) and recovers while idle.
Participation counts feed Jain's index, recorded per round beside energy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.energy import BYTES_PER_MB, JOULES_PER_WH, jain_index
from protos.profile import DeviceProfile

SELECTIONS = ("uniform", "energy-aware")
OBJECTIVES = ("carbon", "energy")
START_LEVEL = (0.1, 1.0)  # a battery's start level, fraction of capacity, uniform in this range
RECHARGE = (0.02, 0.2)  # fraction of capacity recovered per idle round, uniform in this range


@dataclass(frozen=True)
class Candidate:
    """A connected client as the selection sees it: `key` names it stably (partition id, else node id)."""

    key: int
    node: int
    profile: DeviceProfile


def battery_draw(seed: int, key: int) -> tuple[float, float]:
    """(start level, idle recharge per round) as fractions of capacity, from the run seed and the client."""
    start, recharge = np.random.default_rng([seed, 20, key]).random(2)
    return START_LEVEL[0] + start * (START_LEVEL[1] - START_LEVEL[0]), RECHARGE[0] + recharge * (RECHARGE[1] - RECHARGE[0])


def must_take(deadlines: Mapping[int, int], server_round: int, slots: int, window: int) -> int:
    """How many earliest-deadline clients this round must take so every deadline stays reachable."""
    due = sorted(deadlines.values())
    need = 0
    for j in range(window):
        count = sum(d <= server_round + j for d in due)
        need = max(need, count - slots * j)
    return need


def expected_joules(profile: DeviceProfile, seconds: float, upload_mb: float, download_mb: float) -> float:
    """Joules a round of `seconds` reference compute and these transfers is expected to cost on `profile`."""
    return profile.train_watts * seconds / profile.speed + profile.joules_per_mb_sent * upload_mb + profile.joules_per_mb_received * download_mb


def expected_gco2e(profile: DeviceProfile, seconds: float, upload_mb: float, download_mb: float) -> float:
    """gCO2e of that round on `profile`'s power."""
    return expected_joules(profile, seconds, upload_mb, download_mb) / 3.6e6 * profile.carbon_intensity


@dataclass
class ClientSelection:
    """Selection state of a run: last round each client was selected, batteries, participation."""

    mode: str = "uniform"
    fairness_rounds: int = 5
    battery_threshold: float = 0.3
    seed: int = 0
    clients: int = 0  # the run's number of clients (Jain's index counts the never selected as 0)
    objective: str = "carbon"  # what energy-aware selection minimises after batteries: "carbon" (gCO2e) or "energy" (joules)
    fairness_weight: float = 1.5  # g: expected cost x (1 + times selected)^g (0 = pure greedy)
    last: dict[int, int] = field(default_factory=dict)  # key -> last round selected (0: never)
    level: dict[int, float] = field(default_factory=dict)  # key -> battery Wh
    counts: dict[int, int] = field(default_factory=dict)  # key -> times selected
    seconds: float = 1.0  # mean measured training seconds seen so far (the cost estimate's reference)
    _observed: int = 0
    _round: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in SELECTIONS:
            raise ValueError(f"client-selection {self.mode!r} must be one of {', '.join(SELECTIONS)}")
        if self.fairness_rounds < 1:
            raise ValueError(f"selection-fairness-rounds {self.fairness_rounds} must be at least 1")
        if not (0.0 <= self.fairness_weight <= 10.0):
            raise ValueError(f"selection-fairness-weight {self.fairness_weight} must be in [0, 10]")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"selection-objective {self.objective!r} must be one of {', '.join(OBJECTIVES)}")

    def battery_fraction(self, candidate: Candidate) -> float | None:
        """Its battery level as a fraction of capacity (None: mains-powered)."""
        capacity = candidate.profile.battery_wh
        if capacity <= 0:
            return None
        if candidate.key not in self.level:
            self.level[candidate.key] = battery_draw(self.seed, candidate.key)[0] * capacity
        return self.level[candidate.key] / capacity

    def choose(self, server_round: int, candidates: list[Candidate], sampled: list[int], update_mb: float = 0.0) -> list[int]:
        """Node ids to train this round: `sampled` (Flower's uniform draw) or the energy-aware pick of as many."""
        by_node = {c.node: c for c in candidates}
        if self.mode == "uniform":
            chosen = [by_node[n] for n in sampled if n in by_node]
        else:
            chosen = self._energy_aware(server_round, sorted(candidates, key=lambda c: c.key), len(sampled), update_mb)
        low = [c for c in chosen if (f := self.battery_fraction(c)) is not None and f < self.battery_threshold]
        keys = {c.key for c in chosen}
        for c in candidates:  # idle clients recharge; chosen ones drain when their energy comes in
            if c.key not in keys and c.profile.battery_wh > 0:
                self.battery_fraction(c)
                self.level[c.key] = min(c.profile.battery_wh, self.level[c.key] + battery_draw(self.seed, c.key)[1] * c.profile.battery_wh)
        for c in chosen:
            self.last[c.key] = server_round
            self.counts[c.key] = self.counts.get(c.key, 0) + 1
        self._round = {"selected_keys": [c.key for c in chosen], "selected_low_battery": len(low)}
        return [c.node for c in chosen]

    def _energy_aware(self, server_round: int, candidates: list[Candidate], slots: int, update_mb: float) -> list[Candidate]:
        window = self.fairness_rounds
        deadline = {c.key: self.last.get(c.key, 0) + window for c in candidates}
        by_deadline = sorted(candidates, key=lambda c: (deadline[c.key], c.key))
        forced = by_deadline[: must_take(deadline, server_round, slots, window)]

        def preference(c: Candidate) -> tuple:
            fraction = self.battery_fraction(c)
            low = fraction is not None and fraction < self.battery_threshold
            cost = (expected_gco2e if self.objective == "carbon" else expected_joules)(c.profile, self.seconds, update_mb, update_mb)
            cost *= (1 + self.counts.get(c.key, 0)) ** self.fairness_weight
            return (low, cost, self.last.get(c.key, 0), c.key)

        taken = {c.key for c in forced}
        rest = sorted((c for c in candidates if c.key not in taken), key=preference)
        return forced + rest[: max(0, slots - len(forced))]

    def spend(self, key: int, profile: DeviceProfile, joules: float, train_seconds: float) -> None:
        """A selected client's round cost `joules` (drains its battery); its measured seconds update the estimate."""
        if profile.battery_wh > 0 and key in self.level:
            self.level[key] = max(0.0, self.level[key] - joules / JOULES_PER_WH)
        self._observed += 1
        self.seconds += (max(0.0, train_seconds) - self.seconds) / self._observed

    def round_record(self) -> dict[str, Any]:
        """metrics.jsonl fields: participation fairness so far and selected clients below the battery threshold."""
        counts = list(self.counts.values()) + [0] * max(0, self.clients - len(self.counts))
        return {"jain_index": jain_index(counts), "selected_low_battery": self._round.get("selected_low_battery", 0), "client_selection": self.mode}

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last), "level": dict(self.level), "counts": dict(self.counts), "seconds": self.seconds, "observed": self._observed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last = {int(k): int(v) for k, v in state.get("last", {}).items()}
        self.level = {int(k): float(v) for k, v in state.get("level", {}).items()}
        self.counts = {int(k): int(v) for k, v in state.get("counts", {}).items()}
        self.seconds, self._observed = float(state.get("seconds", 1.0)), int(state.get("observed", 0))


def candidates_for(nodes: Iterable[int], planner: Any, grid: Any) -> list[Candidate]:
    """Every connected node with its profile: the planner's (partition id as key; it asks nodes
    it has not met yet) or the default profile keyed by node id."""
    nodes = list(nodes)
    if planner is None:
        from protos.profile import DEFAULT_PROFILE

        return [Candidate(int(n), int(n), DEFAULT_PROFILE) for n in nodes]
    planner.learn(nodes, grid)
    out = []
    for n in nodes:
        pid = planner.partition_of(n)
        out.append(Candidate(pid if pid >= 0 else int(n), int(n), planner.profile_for(n)))
    return out


def update_megabytes(arrays: Mapping[str, Any]) -> float:
    """MB of an ArrayRecord's arrays (what a client downloads, and about what it sends back)."""
    return sum(len(a.data) for a in arrays.values()) / BYTES_PER_MB
