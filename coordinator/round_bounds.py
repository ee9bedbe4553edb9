"""One training round's replies after decoding: the round-level bounds and the client records.

Per reply the strategy keeps a `ReplyRow` (who, which track, the checked reply or why it was
refused). Here the rows that survived every per-reply check meet the bounds that need the whole
round (`aggregation.bounds`): the norm bound relative to the round's own updates, per track
(LoRA and offsite updates live on different scales), the example cap and the weight-share cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aggregation.bounds import cap_examples, cap_weight_share, median, relative_norm_bound
from coordinator.replies import DPReport, EvalReply, Metrics, TrainReply, record_fields


@dataclass(frozen=True)
class ReplyBounds:
    """What bounds a reply: see `finetune.config` (max-update-norm and the fields after it)."""

    max_update_norm: float = -1.0  # < 0 adaptive, 0 off, > 0 absolute
    norm_multiple: float = 5.0
    max_update_bytes: int = 0  # 0 = off
    max_client_examples: int = 100000  # 0 = no cap
    max_weight_share: float = 0.0  # 0 = off

    @property
    def absolute_norm(self) -> float | None:
        return self.max_update_norm if self.max_update_norm > 0 else None

    @property
    def adaptive(self) -> bool:
        return self.max_update_norm < 0


@dataclass
class ReplyRow:
    """One reply of the round: who sent it (authenticated), and what became of it."""

    node_id: int
    client: int  # the name in the records (coordinator.directory)
    kind: str  # the package kind it was sent: which track it updates
    rank: int = 0  # HetLoRA: the rank it was sent (0: the run's)
    reply: TrainReply | None = None
    reason: str | None = None
    metrics: Metrics = field(default_factory=dict)
    dp: DPReport | None = None
    dropped: int = 0  # unknown metric keys it carried
    extra: dict[str, Any] = field(default_factory=dict)  # the planner's fields (profile, simulated time)
    examples: float = 0.0  # the example count after the caps
    weight: float = 0.0  # aggregation weight: `examples` after the weight-share cap
    examples_capped: bool = False

    @property
    def accepted(self) -> bool:
        return self.reason is None and self.reply is not None


def bound_norms(rows: list[ReplyRow], multiple: float, previous: dict[str, float]) -> dict[str, float]:
    """Refuse, per track, updates whose delta norm exceeds `multiple` x the round's reference;
    the new references (median norm of each track's accepted updates) for the next round."""
    references = dict(previous)
    for kind in sorted({row.kind for row in rows if row.accepted}):
        group = [row for row in rows if row.accepted and row.kind == kind]
        bound, reference = relative_norm_bound([row.reply.norm for row in group], multiple, previous.get(kind))
        for row in group:
            if bound is not None and not row.reply.norm <= bound:
                row.reason = (f"delta L2 norm {row.reply.norm:.6g} exceeds {multiple:g} x the round's reference norm "
                              f"{reference:.6g} (adaptive bound, see max-update-norm-multiple)")
        kept = [row.reply.norm for row in group if row.accepted and math.isfinite(row.reply.norm)]
        if kept:
            references[kind] = median(kept)
    return references


def assign_weights(rows: list[ReplyRow], bounds: ReplyBounds, limit_of: Callable[[ReplyRow], int | None]) -> None:
    """Each accepted row's weight: its example count capped (run cap, its own limit), then no
    more than `max-weight-share` of its track's total."""
    accepted = [row for row in rows if row.accepted]
    capped = cap_examples([row.reply.examples for row in accepted], bounds.max_client_examples, [limit_of(row) for row in accepted])
    for row, weight in zip(accepted, capped):
        row.examples = row.weight = weight
        row.examples_capped = weight < row.reply.examples
    for kind in {row.kind for row in accepted}:
        group = [row for row in accepted if row.kind == kind]
        for row, weight in zip(group, cap_weight_share([row.weight for row in group], bounds.max_weight_share)):
            row.weight = weight


def client_entry(server_round: int, row: ReplyRow) -> dict[str, Any]:
    """The clients.jsonl line of a row: checked metrics only, named by the coordinator."""
    entry: dict[str, Any] = {"round": server_round, "node_id": row.node_id, "client_id": row.client, **record_fields(row.metrics), **row.extra}
    if row.dropped:
        entry["ignored_metrics"] = row.dropped
    if row.accepted:
        entry.update(status="accepted", weight=row.weight)
        if row.examples_capped:
            entry["examples_capped"] = True
    else:
        entry.update(status="rejected", reason=row.reason)
    return entry


def weighted(values: Iterable[tuple[float | None, float]]) -> float | None:
    """Weighted mean of the (value, weight) pairs whose value is known; None if none is."""
    pairs = [(v, w) for v, w in values if v is not None and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None


def evaluation_summary(rows: list[EvalReply], cap: int, max_share: float) -> tuple[float, float] | None:
    """(accuracy, loss) weighted by the capped example counts; None without a reply to weigh."""
    if not rows:
        return None
    weights = cap_weight_share(cap_examples([r.examples for r in rows], cap), max_share)
    accuracy = weighted((r.accuracy, w) for r, w in zip(rows, weights))
    loss = weighted((r.loss, w) for r, w in zip(rows, weights))
    if accuracy is None or loss is None or not (math.isfinite(accuracy) and math.isfinite(loss)):
        return None
    return accuracy, loss
