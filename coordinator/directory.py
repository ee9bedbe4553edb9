"""Who each Flower node is in the records: never a value a reply carries.

Flower authenticates the sender of every reply (`msg.metadata.src_node_id`). In simulation the
readable name of a client is its partition id, which the coordinator asks each node for once
(the `query` message its ClientApp answers; the planner asks the same question when the run
has a population). The first answer of a node is kept for the run; a partition id must lie in
`[0, clients)` and belong to no other node, else the node is named by its node id. A deployed
client answers -1 and is named by its node id. Metrics such as `client-id` are never used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message, MessageType, RecordDict

from coordinator.replies import QueryAnswer, read_query_answer

log = logging.getLogger("fedsite.coordinator")

QUERY_TIMEOUT = 120.0  # a node that has not answered by then is named by its node id (it may still train)


class ClientDirectory:
    """node id -> the name its records carry (a learned partition id, else the node id)."""

    def __init__(self, clients: int) -> None:
        self.clients = int(clients)
        self._names: dict[int, int] = {}
        self._owner: dict[int, int] = {}  # partition id -> the node that holds it

    def knows(self, node: int) -> bool:
        return node in self._names

    def name(self, node: int) -> int:
        return self._names.get(node, int(node))

    def partition_of(self, node: int) -> int | None:
        """The partition id taken as `node`'s name, or None (named by its node id, or unknown)."""
        pid = self._names.get(node)
        return pid if pid is not None and self._owner.get(pid) == node else None

    def learn(self, node: int, partition_id: int) -> str | None:
        """Take `partition_id` as `node`'s name (once per node); the reason when it is refused."""
        if node in self._names:
            return None
        reason = None
        if 0 <= partition_id < self.clients and partition_id not in self._owner:
            self._owner[partition_id] = node
            self._names[node] = partition_id
            return None
        if partition_id >= self.clients:
            reason = f"partition id {partition_id} is outside [0, {self.clients})"
        elif partition_id >= 0:
            reason = f"partition id {partition_id} already belongs to node {self._owner[partition_id]}"
        self._names[node] = int(node)
        return reason

    def query(self, nodes: Iterable[int], grid: Any, timeout: float = QUERY_TIMEOUT) -> list[tuple[int, str]]:
        """Ask each node not known yet who it is; (node, reason) for every answer not taken."""
        unknown = list(dict.fromkeys(n for n in nodes if n not in self._names))
        if not unknown:
            return []
        refused: list[tuple[int, str]] = []
        asked = set(unknown)
        queries = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        for reply in grid.send_and_receive(queries, timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in asked or node in self._names:
                continue
            answer, reason = read_query_answer(reply)
            reason = reason or self.learn(node, answer.partition_id)
            if reason:
                refused.append((node, reason))
                log.warning("node %d: %s; it is named by its node id", node, reason)
            self._names.setdefault(node, int(node))
        for node in unknown:
            self._names.setdefault(node, int(node))
        return refused

    def adopt(self, answers: Iterable[tuple[int, QueryAnswer | int]]) -> list[tuple[int, str]]:
        """Learn from answers someone else asked for (the planner's); (node, reason) refused."""
        refused = []
        for node, answer in answers:
            pid = answer.partition_id if isinstance(answer, QueryAnswer) else int(answer)
            reason = self.learn(node, pid)
            if reason:
                refused.append((node, reason))
        return refused


def assigned_train_examples(config: Any) -> Callable[[int], int | None]:
    """partition id -> the training examples the run gives that simulated client (None: unknown).

    The coordinator holds the run's data source (it evaluates on it), so it can partition it as
    the clients do (`finetune.sources.client_splits`); computed once, on first use.
    """
    sizes: list[int] = []
    failed: list[bool] = []

    def limit(partition_id: int) -> int | None:
        if not sizes and not failed:
            try:
                from finetune.partition import partition_indices
                from finetune.sources import run_splits

                train, _ = run_splits(config)
                parts = partition_indices(train, config.clients, config.partitioning, config.dirichlet_alpha, config.shards_per_client, config.seed, config.partition_size_sigma)
                sizes.extend(len(part) for part in parts)
            except Exception as err:  # e.g. data only the clients hold: the run's example cap still applies
                failed.append(True)
                log.warning("partition sizes unknown (%s: %s); simulated clients are capped by max-client-examples only", type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
        return sizes[partition_id] if 0 <= partition_id < len(sizes) else None

    return limit
