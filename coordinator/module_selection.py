"""Kill-and-Revive module selection (DLoRA, Gao & Zhang, EMNLP 2024): train and send only the
LoRA modules that matter.

Each round the coordinator picks `kr-active-share` of the adapter's LoRA modules; every client
of the round gets the same selection (in the train message, `protos.selection`), freezes the
other modules' factors and returns only the selected ones. After aggregation each active
module is scored by its aggregated update (`kr-score`: "update-norm", the L2 norm of the
module's change this round, or "update-rms", that norm per value, which does not favour larger
matrices). A killed module keeps the score it had when it was last active. With
"gradient" the clients score every module, killed ones too: each measures the gradient norm of
every module's factors at its first step (`client.selection`) and the reply's `kr-grad-norms`
carries them; a client's vector is normalised to sum 1 (every client has the same say, and no
client can outweigh the rest by scale), and a shared selection ranks by the round's mean
vector (median under the median and trimmed-mean rules). As every module is scored afresh each round, nothing needs reviving: `kr-revive-every`
does not apply.

Selection, deterministic in (seed, round):
- modules never scored come first (in a seeded order), so the first rounds cycle through the
  whole adapter before anything is killed;
- then the highest-scored modules stay active: a module whose updates stay small falls below
  the others and is killed;
- every `kr-revive-every` rounds, half the active slots (at least one) go to the killed modules
  that have been killed longest (ties in seeded order): revived, they are scored afresh and
  stay if their update is now large.

`kr-lowest-block = L` keeps every module of blocks 0..L-1 killed (never trained, never revived;
the share still counts all modules, capped at those left), so each client's backward stops at
block L: the compute saving the rule alone gives only when its choice happens to avoid the
bottom blocks.

`kr-assign = "per-client"` runs the same rule per client (FedAvg and FedProx, not secure): each
client has its own scores, from the norm of its own update per module (the modules most
sensitive to its data), its own revival history, and a seeded order of its own, so while a
client is new it cycles through modules no other client of the round need share, and every
round covers far more of the adapter than one shared selection can. `shared` (the default)
gives every client of a round one selection, as SecAgg+ needs.

`kr-prior = "federation"` (per-client only) ranks the modules a client has not scored yet by
the federation's mean score (over the clients that scored each module, their latest scores)
instead of trying them in a seeded order: a client that trains only a few times starts from
the modules the others found sensitive, where without a prior it spends its first turns
exploring. Its own score replaces the prior once it has one; modules no client has scored
still come first.

Aggregation over a selection (`aggregate_selected`): FedAvg and FedProx average each module over
the clients that sent it (`aggregation.partial.partial_mean`); other rules (FFA-LoRA, RoLoRA,
median, trimmed mean, the server optimizers, DP-FedAvg) run on the selected keys alone and are
merged back, so killed modules stay exactly as they were. The server optimizers thus step only
the updated modules; a killed module's moments are kept as they were (not decayed) until it is
revived.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from aggregation.partial import merge, partial_mean, subset
from finetune.config import KR_SCORES
from protos.selection import ACTIVE_KEY, encode_selection, keys_of, layer_of, modules_of, selectable

NamedArrays = Mapping[str, np.ndarray]
SCORES = KR_SCORES
# rules whose averaging is per key over the senders (partial sets need no merge step)
MEAN_RULES = ("fedavg", "fedprox")
ROBUST_RULES = ("median", "trimmed-mean")  # rules that bound one client's say: the gradient scores' centre follows


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


def gradient_scores(modules: Sequence[str], norms: Sequence[float]) -> dict[str, float] | None:
    """A client's `kr-grad-norms` (one per module, in `sorted(modules)` order) as scores summing
    to 1, or None when it carries no signal (every norm 0). The reply reader checked the values."""
    total = math.fsum(norms)
    return {m: float(v) / total for m, v in zip(sorted(modules), norms)} if total > 0 else None


def kill_revive(
    modules: Sequence[str], scores: Mapping[str, float], last_active: Mapping[str, int], count: int, server_round: int, revive_every: int, seed: int,
    client: int | None = None,
) -> list[str]:
    """The `count` modules active in `server_round` (in `modules`' order); see the module docstring.
    `client` (per-client selection) gives that client a seeded order of its own."""
    count = max(1, min(count, len(modules)))
    entropy = [int(seed) & 0xFFFFFFFF, int(server_round) & 0xFFFFFFFF] + ([] if client is None else [int(client) & 0xFFFFFFFF])
    rng = np.random.default_rng(entropy)
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


def depth_of(modules: Sequence[str]) -> int:
    """How many blocks `modules` span: one more than the highest block index (modules in no block count as block 0)."""
    return 1 + max((layer_of(m) or 0) for m in modules)


@dataclass
class KillRevive:
    """The coordinator's per-round selection and the scores it is made from (checkpointed).

    `assign = "shared"`: one selection per round (`active`, `observe`); "per-client": one per
    client (`active_for`, `observe_clients`), each from that client's own scores and history.
    """

    modules: list[str]
    share: float = 0.5
    score: str = "update-norm"
    revive_every: int = 3
    seed: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    last_active: dict[str, int] = field(default_factory=dict)
    assign: str = "shared"
    lowest_block: int = 0
    prior: str = "none"
    robust: bool = False  # gradient, shared: the clients' median vector instead of their mean
    client_scores: dict[int, dict[str, float]] = field(default_factory=dict)
    client_last_active: dict[int, dict[str, int]] = field(default_factory=dict)
    _round: int = field(default=-1, repr=False)
    _active: list[str] = field(default_factory=list, repr=False)
    _by_client: dict[int, list[str]] = field(default_factory=dict, repr=False)

    @property
    def per_client(self) -> bool:
        return self.assign == "per-client"

    @property
    def candidates(self) -> list[str]:
        """The modules a selection may hold: those in block `lowest_block` or above (or in no block)."""
        return [m for m in self.modules if selectable(m, self.lowest_block)]

    @property
    def gradient(self) -> bool:
        return self.score == "gradient"

    @property
    def _revive_every(self) -> int:
        return 0 if self.gradient else self.revive_every  # every module is re-scored by every probe

    @property
    def count(self) -> int:
        return max(1, min(len(self.candidates), round(self.share * len(self.modules))))

    def _start(self, server_round: int) -> None:
        if server_round != self._round:
            self._round, self._by_client = server_round, {}
            self._active = [] if self.per_client else kill_revive(
                self.candidates, self.scores, self.last_active, self.count, server_round, self._revive_every, self.seed)

    def active(self, server_round: int) -> list[str]:
        """This round's shared active modules (the same answer for every call within a round)."""
        self._start(server_round)
        return list(self._active)

    def active_for(self, server_round: int, client: int) -> list[str]:
        """`client`'s active modules this round: the shared ones, or (per-client) its own."""
        self._start(server_round)
        if not self.per_client:
            return list(self._active)
        if client not in self._by_client:
            scores = self.client_scores.get(client, {})
            if self.prior == "federation":
                scores = {**self.federation_scores(), **scores}
            self._by_client[client] = kill_revive(self.candidates, scores, self.client_last_active.get(client, {}),
                                                  self.count, server_round, self._revive_every, self.seed, client)
        return list(self._by_client[client])

    def federation_scores(self) -> dict[str, float]:
        """Per-client: each module's mean score over the clients that have scored it (their latest)."""
        sums: dict[str, list[float]] = {}
        for scores in self.client_scores.values():
            for module, score in scores.items():
                sums.setdefault(module, []).append(score)
        return {m: math.fsum(v) / len(v) for m, v in sums.items()}

    @property
    def current(self) -> list[str]:
        """The active modules of the round last asked for (per-client: every client's, in the adapter's order)."""
        chosen = set(self._active).union(*self._by_client.values())
        return [m for m in self.modules if m in chosen]

    def current_for(self, client: int) -> list[str]:
        """What `client` was asked to train in the round last asked for (nothing if it was not asked)."""
        return list(self._by_client.get(client, [])) if self.per_client else list(self._active)

    def message_value(self, server_round: int, client: int | None = None) -> str:
        return encode_selection(self.active(server_round) if client is None else self.active_for(server_round, client))

    def observe(self, old: NamedArrays, new: NamedArrays, grads: Mapping[int, Sequence[float]] | None = None) -> None:
        """Score the round's shared active modules by their aggregated change (gradient: every
        module by the mean of the clients' normalised `grads`; no vector, no change)."""
        if self.per_client:
            return
        if self.gradient:
            vectors = [v for v in (gradient_scores(self.modules, g) for g in (grads or {}).values()) if v is not None]
            if vectors:  # a robust run (median, trimmed mean) ranks by the median vector, as it aggregates
                center = (lambda xs: float(np.median(xs))) if self.robust else (lambda xs: math.fsum(xs) / len(xs))
                self.scores = {m: center([v[m] for v in vectors]) for m in self.modules}
        else:
            self.scores.update(module_scores(old, new, self._active, self.score))
        self.last_active.update({m: self._round for m in self._active})

    def observe_clients(self, old: NamedArrays, updates: Mapping[int, NamedArrays], grads: Mapping[int, Sequence[float]] | None = None) -> None:
        """Per-client: score each client's modules by its own update (its trained arrays) from
        `old`; gradient: every module by the client's normalised `grads` (kept if it sent none)."""
        if not self.per_client:
            return
        for client, update in updates.items():
            active = self._by_client.get(client, [])
            if not self.gradient:
                self.client_scores.setdefault(client, {}).update(module_scores(old, update, active, self.score))
            elif (vector := gradient_scores(self.modules, (grads or {}).get(client, ()))) is not None:
                self.client_scores[client] = vector
            self.client_last_active.setdefault(client, {}).update({m: self._round for m in active})

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl fields of the round (per-client: the union, the mean share, and each client's selection)."""
        current = self.current
        layers = sorted({layer for layer in map(layer_of, current) if layer is not None})
        share = (sum(map(len, self._by_client.values())) / len(self._by_client) if self._by_client else 0) if self.per_client else len(current)
        out = {"module_selection": "kill-revive", "kr_assign": self.assign, "kr_lowest_block": self.lowest_block, **({"kr_prior": self.prior} if self.per_client else {}),
               "active_modules": current, "active_share": share / len(self.modules),
               "active_layers": layers, **({"lowest_active_layer": layers[0]} if layers else {})}
        if self.per_client:
            lowest = [min(filter(lambda x: x is not None, map(layer_of, a)), default=0) for a in self._by_client.values()]
            out["active_by_client"] = {str(c): a for c, a in sorted(self._by_client.items())}
            out["client_lowest_active_layer"] = sum(lowest) / len(lowest) if lowest else 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        clients = {str(c): {"scores": dict(s), "last_active": dict(self.client_last_active.get(c, {}))} for c, s in self.client_scores.items()}
        return {"scores": dict(self.scores), "last_active": dict(self.last_active), **({"clients": clients} if clients else {})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        known = set(self.modules)

        def scores(d: Any) -> dict[str, float]:
            return {str(k): float(v) for k, v in dict(d or {}).items() if k in known}

        def rounds(d: Any) -> dict[str, int]:
            return {str(k): int(v) for k, v in dict(d or {}).items() if k in known}

        self.scores, self.last_active = scores(state.get("scores")), rounds(state.get("last_active"))
        clients = dict(state.get("clients") or {})
        self.client_scores = {int(c): scores(v.get("scores")) for c, v in clients.items()}
        self.client_last_active = {int(c): rounds(v.get("last_active")) for c, v in clients.items()}


def selection_for(config: Any, arrays: NamedArrays) -> KillRevive | None:
    """The run's selector over the LoRA modules of `arrays`, or None for `module-selection = "all"`."""
    if getattr(config, "module_selection", "all") != "kill-revive":
        return None
    modules = modules_of(arrays)
    if not modules:
        raise ValueError("module-selection 'kill-revive': the adapter has no LoRA modules")
    selector = KillRevive(modules, config.kr_active_share, config.kr_score, config.kr_revive_every, config.seed,
                          assign=getattr(config, "kr_assign", "shared"), lowest_block=getattr(config, "kr_lowest_block", 0),
                          prior=getattr(config, "kr_prior", "none"), robust=getattr(config, "aggregation", "fedavg") in ROBUST_RULES)
    if not selector.candidates:
        raise ValueError(f"kr-lowest-block {selector.lowest_block}: the adapter has no LoRA module at or above that block (its blocks are 0-{depth_of(modules) - 1})")
    return selector


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


def with_selections(messages: Sequence[Message], selector: KillRevive, server_round: int, client_of: Callable[[int], int]) -> list[Message]:
    """Per-client selection: each train message (to node n) gets a copy of its content whose config
    names the modules of client `client_of(n)`; a shared selection leaves `messages` as they are."""
    if not selector.per_client:
        return list(messages)
    out = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        content = RecordDict(dict(msg.content.items()))
        content["config"] = ConfigRecord({**dict(msg.content["config"]), ACTIVE_KEY: selector.message_value(server_round, client_of(node))})
        out.append(Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node))
    return out
