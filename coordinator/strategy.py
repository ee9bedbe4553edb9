"""The Fedsite strategy: Flower's FedAvg sampling, with validated, recorded LoRA aggregation.

Every reply is checked against the current global arrays before it can reach the aggregate;
a bad one is rejected with a reason in the round's metrics and the round goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from aggregation.validate import validate_update
from coordinator.aggregate import Aggregator, train_factors
from coordinator.client_dp import ClientLevelDP
from coordinator.offsite import KIND_EMULATOR, KIND_LORA, OffsiteTrack, join_tracks, split_tracks
from coordinator.planner import Planner, planner_for
from coordinator.results import RunRecorder
from finetune.base_delta import split_base
from protos.codecs import CodecError
from protos.tensors import from_array_record, to_array_record
from protos.updates import decode_update

log = logging.getLogger("fedsite.coordinator")


def local_dp_entry(server_round: int, client: int, metrics: dict) -> dict:
    """A privacy-ledger line from the dp-* metrics a local-DP client reports."""
    fields = ("noise-multiplier", "sample-rate", "steps", "total-steps", "delta", "epsilon")
    entry = {"round": server_round, "client": client, "mechanism": "local-dp-sgd", "accountant": "rdp"}
    entry.update({name.replace("-", "_"): metrics[f"dp-{name}"] for name in fields})
    entry["steps"], entry["total_steps"] = int(entry["steps"]), int(entry["total_steps"])
    return entry


def client_name(msg: Message, metrics: dict) -> int:
    """A simulated client's partition id (readable), else the Flower node id."""
    client_id = metrics.get("client-id", -1)
    return int(client_id) if isinstance(client_id, int) and client_id >= 0 else int(msg.metadata.src_node_id)


class FedsiteStrategy(FedAvg):
    """FedAvg over LoRA arrays, weighted by each client's number of training examples."""

    def __init__(
        self,
        recorder: RunRecorder,
        aggregator: Aggregator | None = None,
        *,
        fraction_train: float,
        fraction_evaluate: float,
        min_train_clients: int,
        max_update_norm: float = 0.0,
        max_update_bytes: int = 0,
        client_dp: ClientLevelDP | None = None,
        planner: Planner | None = None,
        offsite: OffsiteTrack | None = None,
        offsite_aggregator: Aggregator | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_clients,
            min_evaluate_nodes=1 if fraction_evaluate > 0 else 0,
            min_available_nodes=min_train_clients,
        )
        self.recorder = recorder
        self.aggregator = aggregator or Aggregator()
        self.client_dp = client_dp
        # per-client packages, dropouts and stragglers when the run has a population (else None)
        self.planner = planner if planner is not None else planner_for(recorder.config)
        self._sample_rate = 1.0
        # 0 disables a bound; the norm bounds the distance from the current global arrays
        self.bounds = {"max_norm": max_update_norm or None, "max_bytes": max_update_bytes or None, "relative": True}
        self._global: dict[str, np.ndarray] = {}
        self._round_started = 0.0
        # a resumed run: Flower counts rounds from 1 again, the run goes on after the checkpoint's round
        self.round_offset = 0
        self._awaited: set[int] = set()  # sampled nodes whose reply has not come in this round
        # offsite tuning: emulator clients train the adapter track, aggregated only among themselves
        self.offsite = offsite
        self.offsite_aggregator = offsite_aggregator or Aggregator(self.aggregator.rule)
        self._offsite_global: dict[str, np.ndarray] = {}
        self._kinds: dict[int, str] = {}  # node id -> the kind of package it was sent this round
        self._emulator_nodes: set[int] = set()  # never sent the LoRA track, not even to evaluate

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        server_round += self.round_offset
        self._global, self._offsite_global = split_tracks(from_array_record(arrays))
        if self.offsite is not None:
            arrays = to_array_record(self._global)  # LoRA clients get the LoRA track only
        config["train-factors"] = train_factors(self.aggregator.rule, server_round)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sample_rate = len(messages) / max(1, len(list(grid.get_node_ids())))
        self.recorder.record(sampled=len(messages))
        if self.planner is not None:
            messages = self.planner.plan_round(server_round, messages, arrays, grid)
        if self.offsite is not None:
            messages = self.offsite.route(messages, self._offsite_records())
        self._kinds = {m.metadata.dst_node_id: str(m.content["config"].get("package-kind", KIND_LORA)) for m in messages}
        self._emulator_nodes |= {node for node, kind in self._kinds.items() if kind == KIND_EMULATOR}
        self._awaited = {m.metadata.dst_node_id for m in messages}
        log.info("round %d: training on %d clients", server_round, len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        started = time.perf_counter()
        server_round += self.round_offset
        accepted: list[tuple[int, dict[str, np.ndarray], dict]] = []
        kinds: dict[int, str] = {}  # client -> package kind, to aggregate each kind with its own
        rejected: list[dict] = []
        for msg in replies:
            reason, update, metrics = self._read_reply(msg)
            node = client_name(msg, metrics)
            entry = {"round": server_round, "node_id": msg.metadata.src_node_id, **{k.replace("-", "_"): v for k, v in metrics.items()}}
            if self.planner is not None and not msg.has_error():
                late, simulated = self.planner.check_reply(msg.metadata.src_node_id, metrics)
                entry.update(simulated)
                reason = reason or late
            if reason is None:
                accepted.append((node, update, metrics))
                kinds[node] = self._kinds.get(msg.metadata.src_node_id, KIND_LORA)
                entry["status"] = "accepted"
                if "dp-epsilon" in metrics:
                    self.recorder.record_privacy(local_dp_entry(server_round, node, metrics))
            else:
                rejected.append({"client": node, "reason": reason})
                entry.update(status="rejected", reason=reason)
                log.warning("round %d: rejected update from client %d: %s", server_round, node, reason)
            self.recorder.record_client(entry)
            self._awaited.discard(msg.metadata.src_node_id)
        if self._awaited:  # killed, disconnected or slower than round-timeout: the round goes on without them
            log.warning("round %d: no reply from %d sampled client(s) within round-timeout, dropped: %s", server_round, len(self._awaited), sorted(self._awaited))
            self.recorder.record(dropped=sorted(self._awaited))
        if self.planner is not None:
            self.recorder.record(**self.planner.round_record())

        if not accepted:
            log.warning("round %d: no valid update; the global adapter stays as it was", server_round)
            self.recorder.record(aggregation=self.aggregator.rule, contributors=[], rejected=rejected, upload_bytes=0, aggregation_seconds=0.0)
            return None, None

        weights = [float(m["num-examples"]) for _, _, m in accepted]
        by_kind = {kind: [(n, u, w) for (n, u, _), w in zip(accepted, weights) if kinds[n] == kind] for kind in (KIND_LORA, KIND_EMULATOR)}
        new_global = self._aggregate_lora(server_round, by_kind[KIND_LORA]) if by_kind[KIND_LORA] else self._global
        new_offsite = self._offsite_global
        if by_kind[KIND_EMULATOR]:  # offsite updates are averaged only among offsite clients
            _, updates, kind_weights = zip(*by_kind[KIND_EMULATOR])
            new_offsite = self.offsite_aggregator(self._offsite_global, list(updates), list(kind_weights), server_round)
        if self.offsite is not None:
            self.recorder.record(contributors_by_kind={kind: [n for n, _, _ in group] for kind, group in by_kind.items()})
            new_global = join_tracks(new_global, new_offsite)
        total = sum(weights)
        train_loss = sum(float(m.get("train-loss", 0.0)) * w for (_, _, m), w in zip(accepted, weights)) / total
        upload = int(sum(int(m.get("upload-bytes", 0)) for _, _, m in accepted))
        self.recorder.record(
            aggregation=self.aggregator.rule,
            contributors=[node for node, _, _ in accepted],
            rejected=rejected,
            train_loss=train_loss,
            train_examples=int(total),
            upload_bytes=upload,
            aggregation_seconds=time.perf_counter() - started,
        )
        log.info("round %d: aggregated %d updates (%d rejected), train loss %.3f", server_round, len(accepted), len(rejected), train_loss)
        return to_array_record(new_global), MetricRecord({"train-loss": train_loss, "num-examples": int(total), "upload-bytes": upload})

    def _aggregate_lora(self, server_round: int, group: list[tuple[int, dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
        """The LoRA track's rule (or DP-FedAvg with client-level DP) over its clients' updates."""
        nodes, updates, weights = (list(x) for x in zip(*group))
        if self.client_dp is None:
            return self.aggregator(self._global, updates, weights, server_round)
        new_global, ledger = self.client_dp(self._global, updates, self._sample_rate)
        for node in nodes:
            self.recorder.record_privacy({"round": server_round, "client": node, **ledger})
        self.recorder.record(privacy=ledger)
        return new_global

    def _read_reply(self, msg: Message) -> tuple[str | None, dict[str, np.ndarray], dict]:
        """(reason or None, update, metrics) of one reply; never raises on a bad client."""
        if msg.has_error():
            return f"client error: {msg.error.reason}", {}, {}
        if "declined" in msg.content.config_records:
            return f"declined: {msg.content['declined']['reason']}", {}, dict(msg.content.metric_records.get("metrics", {}))
        try:
            metrics = dict(msg.content["metrics"])
            # a HetLoRA client of rank r was sent (and returns) the first r rank directions
            track = self._offsite_global if self._kinds.get(msg.metadata.src_node_id) == KIND_EMULATOR else self._global
            track = split_base(track)[0]  # clients return LoRA arrays only, never the base-weight update
            base, rank = self.planner.base_for(msg.metadata.src_node_id, track) if self.planner else (track, 0)
            update = decode_update(from_array_record(msg.content["arrays"]), base)
        except CodecError as err:
            return f"undecodable update: {err}", {}, {}
        except (KeyError, TypeError, ValueError) as err:
            return f"malformed reply: {err}", {}, {}
        examples = metrics.get("num-examples")
        if not isinstance(examples, (int, float)) or not examples > 0:
            return f"num-examples must be positive, got {examples!r}", update, metrics
        reason = validate_update(update, base, **self.bounds)
        return reason, (self.planner.restore(update, rank) if reason is None and rank else update), metrics

    def _offsite_records(self) -> Callable[[int], ArrayRecord]:
        """node -> the offsite arrays it trains: the track's global at its package's LoRA rank
        (HetLoRA), one record per rank."""
        if self.planner is None:
            record = to_array_record(self._offsite_global)
            return lambda node: record
        record_at = self.planner.records_by_rank(self._offsite_global)
        return lambda node: record_at(self.planner.rank_for(node))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Federated evaluation of the LoRA track on clients that hold the backbone."""
        if self.offsite is None:
            return super().configure_evaluate(server_round, arrays, config, grid)
        lora = to_array_record(split_tracks(from_array_record(arrays))[0])
        return [m for m in super().configure_evaluate(server_round, lora, config, grid) if m.metadata.dst_node_id not in self._emulator_nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = [m for m in replies if not m.has_error() and "eval-accuracy" in m.content["metrics"]]
        if not replies:
            return None
        rows = [m.content["metrics"] for m in replies]
        total = sum(float(r["num-examples"]) for r in rows)
        accuracy = sum(float(r["eval-accuracy"]) * float(r["num-examples"]) for r in rows) / total
        loss = sum(float(r["eval-loss"]) * float(r["num-examples"]) for r in rows) / total
        self.recorder.record(federated_eval_accuracy=accuracy, federated_eval_loss=loss, federated_eval_clients=len(rows))
        return MetricRecord({"eval-accuracy": accuracy, "eval-loss": loss})

    def round_seconds(self) -> float:
        return time.perf_counter() - self._round_started
