"""Kill-and-Revive module selection (DLoRA, Gao & Zhang, EMNLP 2024): train and send only the
LoRA modules that matter.

Each round the coordinator picks `kr-active-share` of the adapter's LoRA modules; every client
of the round gets the same selection (in the train message, `protos.selection`), freezes the
other modules' factors and returns only the selected ones. After aggregation each active
module is scored by its aggregated update (`kr-score`: "update-norm", the L2 norm of the
module's change this round, or "update-rms", that norm per value, which does not favour larger
matrices). A killed module keeps the score it had when it was last active.

Selection, deterministic in (seed, round):
- modules never scored come first (in a seeded order), so the first rounds cycle through the
  whole adapter before anything is killed;
- then the highest-scored modules stay active: a module whose updates stay small falls below
  the others and is killed;
- every `kr-revive-every` rounds, half the active slots (at least one) go to the killed modules
  that have been killed longest (ties in seeded order): revived, they are scored afresh and
  stay if their update is now large.

Aggregation over a selection (`aggregate_selected`): FedAvg and FedProx average each module over
the clients that sent it (`aggregation.partial.partial_mean`); other rules (FFA-LoRA, RoLoRA,
median, trimmed mean, the server optimizers, DP-FedAvg) run on the selected keys alone and are
merged back, so killed modules stay exactly as they were. The server optimizers thus step only
the updated modules; a killed module's moments are kept as they were (not decayed) until it is
revived.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregation.partial import merge, partial_mean, subset
from finetune.config import KR_SCORES
from protos.selection import encode_selection, keys_of, modules_of

NamedArrays = Mapping[str, np.ndarray]
SCORES = KR_SCORES
# rules whose averaging is per key over the senders (partial sets need no merge step)
MEAN_RULES = ("fedavg", "fedprox")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def module_scores(old: NamedArrays, new: NamedArrays, modules: Sequence[str], score: str = "update-norm") -> dict[str, float]:
    """Each module's score from its aggregated change `new - old` (float64)."""
    if score not in SCORES:
        raise ValueError(f"kr-score must be one of {', '.join(SCORES)}, got {score!r}")
    out = {}
    for module in modules:
        keys = keys_of(new, [module])
        sq = sum(float(np.sum((np.asarray(new[k], np.float64) - np.asarray(old[k], np.float64)) ** 2)) for k in keys)
        size = sum(int(np.size(new[k])) for k in keys)
        out[module] = math.sqrt(sq) / (math.sqrt(size) if score == "update-rms" and size else 1.0)
    return out


def kill_revive(
    modules: Sequence[str], scores: Mapping[str, float], last_active: Mapping[str, int], count: int, server_round: int, revive_every: int, seed: int
) -> list[str]:
    """The `count` modules active in `server_round` (in `modules`' order); see the module docstring."""
    count = max(1, min(count, len(modules)))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(server_round) & 0xFFFFFFFF])
    tie = dict(zip(modules, rng.permutation(len(modules)).tolist()))
    unscored = sorted((m for m in modules if m not in scores), key=tie.__getitem__)
    scored = sorted((m for m in modules if m in scores), key=lambda m: (-scores[m], tie[m]))
    ranked = unscored + scored
    active, killed = ranked[:count], ranked[count:]
    if revive_every > 0 and server_round % revive_every == 0 and killed and not unscored:
        revive = min(len(killed), max(1, count // 2))
        longest = sorted(killed, key=lambda m: (last_active.get(m, -1), tie[m]))[:revive]
        active = active[: count - revive] + longest
    chosen = set(active)
    return [m for m in modules if m in chosen]


def layer_of(module: str) -> int | None:
    """The transformer block index in a module name (`...layers.3.self_attn.q_proj` -> 3)."""
    match = _LAYER.search(module)
    return int(match.group(1)) if match else None


@dataclass
class KillRevive:
    """The coordinator's per-round selection and the scores it is made from (checkpointed)."""

    modules: list[str]
    share: float = 0.5
    score: str = "update-norm"
    revive_every: int = 3
    seed: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    last_active: dict[str, int] = field(default_factory=dict)
    _round: int = field(default=-1, repr=False)
    _active: list[str] = field(default_factory=list, repr=False)

    @property
    def count(self) -> int:
        return max(1, min(len(self.modules), round(self.share * len(self.modules))))

    def active(self, server_round: int) -> list[str]:
        """This round's active modules (the same answer for every call within a round)."""
        if server_round != self._round:
            self._round = server_round
            self._active = kill_revive(self.modules, self.scores, self.last_active, self.count, server_round, self.revive_every, self.seed)
        return list(self._active)

    @property
    def current(self) -> list[str]:
        """The active modules of the round last asked for."""
        return list(self._active)

    def message_value(self, server_round: int) -> str:
        return encode_selection(self.active(server_round))

    def observe(self, old: NamedArrays, new: NamedArrays) -> None:
        """Score the round's active modules by their aggregated change."""
        self.scores.update(module_scores(old, new, self._active, self.score))
        self.last_active.update({m: self._round for m in self._active})

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl fields of the round."""
        layers = sorted({layer for layer in map(layer_of, self._active) if layer is not None})
        return {"module_selection": "kill-revive", "active_modules": list(self._active), "active_share": len(self._active) / len(self.modules),
                "active_layers": layers, **({"lowest_active_layer": layers[0]} if layers else {})}

    def state_dict(self) -> dict[str, Any]:
        return {"scores": dict(self.scores), "last_active": dict(self.last_active)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        known = set(self.modules)
        self.scores = {str(k): float(v) for k, v in dict(state.get("scores", {})).items() if k in known}
        self.last_active = {str(k): int(v) for k, v in dict(state.get("last_active", {})).items() if k in known}


def selection_for(config: Any, arrays: NamedArrays) -> KillRevive | None:
    """The run's selector over the LoRA modules of `arrays`, or None for `module-selection = "all"`."""
    if getattr(config, "module_selection", "all") != "kill-revive":
        return None
    modules = modules_of(arrays)
    if not modules:
        raise ValueError("module-selection 'kill-revive': the adapter has no LoRA modules")
    return KillRevive(modules, config.kr_active_share, config.kr_score, config.kr_revive_every, config.seed)


def aggregate_selected(current: NamedArrays, updates: Sequence[NamedArrays], weights: Sequence[float],
                       aggregate: Callable[[dict[str, np.ndarray]], NamedArrays], *, per_key: bool = False) -> dict[str, np.ndarray]:
    """The new global arrays from updates of the selected modules only (killed ones unchanged).

    `per_key` (FedAvg, FedProx: `MEAN_RULES`): average each key over the clients that sent it.
    Else `aggregate(sub)` runs the run's rule (or DP-FedAvg) on `sub`, the global cut to the
    updates' keys (all updates must carry the same ones), and its output is merged back.
    """
    if per_key:
        return partial_mean(current, updates, weights)
    keys = list(updates[0])
    if any(set(u) != set(keys) for u in updates[1:]):
        raise ValueError("aggregate_selected: the updates carry different modules; only fedavg and fedprox average partial sets per key")
    return merge(current, aggregate(subset(current, keys)))
