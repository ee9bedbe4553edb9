"""The Fedsite strategy: Flower's FedAvg sampling, with validated, bounded, recorded LoRA aggregation.

Every reply is untrusted input. It goes through one checked decoding step
(`coordinator.replies`: metric schema, byte budget before allocation, codec and update
validation against the arrays the client was sent); then the round-level bounds
(`coordinator.round_bounds`: a norm bound relative to the round's median by default, the
example cap, the weight-share cap) decide what reaches the aggregate. A bad reply is rejected
with a one-line reason in clients.jsonl and the round's metrics, and the round goes on; no
exception from client content reaches Flower. Records name clients by their authenticated
node id, or the partition id the coordinator learned for that node (`coordinator.directory`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from aggregation.partial import under
from coordinator.aggregate import Aggregator, train_factors
from coordinator.client_dp import ClientLevelDP
from coordinator.directory import QUERY_TIMEOUT, ClientDirectory
from coordinator.energy import Energy, reply_energy, total_fields
from coordinator.ledger import PrivacyLedger
from coordinator.module_selection import MEAN_RULES, KillRevive, aggregate_selected, with_selections
from coordinator.offsite import KIND_EMULATOR, KIND_LORA, OffsiteTrack, join_tracks, restore_track, split_tracks, track_state
from coordinator.planner import Planner
from coordinator.replies import EvalReply, Rejected, read_evaluate_reply, read_train_reply
from coordinator.results import RunRecorder
from coordinator.selection import ClientSelection, candidates_for, update_megabytes
from coordinator.round_bounds import ReplyBounds, ReplyRow, assign_weights, bound_norms, client_entry, evaluation_summary, weighted
from finetune.base_delta import split_base
from protos.profile import DEFAULT_PROFILE
from protos.selection import ACTIVE_KEY, restrict
from protos.tensors import from_array_record, to_array_record

log = logging.getLogger("fedsite.coordinator")


class FedsiteStrategy(FedAvg):
    """FedAvg over LoRA arrays, weighted by each client's (capped) number of training examples."""

    def __init__(
        self,
        recorder: RunRecorder,
        aggregator: Aggregator | None = None,
        *,
        fraction_train: float,
        fraction_evaluate: float,
        min_train_clients: int,
        max_update_norm: float = -1.0,
        max_update_norm_multiple: float = 5.0,
        max_update_bytes: int = 0,
        max_client_examples: int = 100000,
        max_weight_share: float = 0.0,
        assigned_examples: Callable[[int], int | None] | None = None,
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
        self.planner = planner
        self._sample_rate = 1.0
        # norms bound the distance from the arrays each client was sent; see round_bounds.ReplyBounds
        self.bounds = ReplyBounds(max_update_norm, max_update_norm_multiple, max_update_bytes, max_client_examples, max_weight_share)
        # simulation: partition id -> the training examples the run assigned it (a client cannot have more)
        self.assigned_examples = assigned_examples
        config = recorder.config
        self.directory = ClientDirectory(getattr(config, "clients", 0))
        self.ledger = PrivacyLedger(getattr(config, "delta", None))
        # a client evaluates at most client-eval-examples: the tighter of that and the run's cap weighs its reply
        caps = [c for c in (max_client_examples, int(getattr(config, "client_eval_examples", 0))) if c > 0]
        self._eval_cap = min(caps) if caps else 0
        self._norm_reference: dict[str, float] = {}  # track -> median accepted norm of the last round that had one
        self._errors_logged: set[str] = set()
        self._global: dict[str, np.ndarray] = {}
        self._round_started = 0.0
        self._evaluate_started, self._evaluating = 0.0, False
        # a resumed run: Flower counts rounds from 1 again, the run goes on after the checkpoint's round
        self.round_offset = 0
        self._awaited: set[int] = set()  # sampled nodes whose reply has not come in this round
        # offsite tuning: emulator clients train the adapter track, aggregated only among themselves
        self.offsite = offsite
        self.offsite_aggregator = offsite_aggregator or Aggregator(self.aggregator.rule)
        self._offsite_global: dict[str, np.ndarray] = {}
        self._align_batches: list | None = None  # the coordinator's public alignment set (emulator-align-steps)
        self._kinds: dict[int, str] = {}  # node id -> the kind of package it was sent this round
        self._emulator_nodes: set[int] = set()  # never sent the LoRA track, not even to evaluate
        # who trains (coordinator/selection.py) and what their rounds cost (coordinator/energy.py)
        self.selection = ClientSelection(getattr(config, "client_selection", "uniform"), getattr(config, "selection_fairness_rounds", 5),
                                         getattr(config, "selection_battery_threshold", 0.3), getattr(config, "seed", 0), getattr(config, "clients", 0),
                                         getattr(config, "selection_objective", "carbon"), getattr(config, "selection_fairness_weight", 1.5))
        self._download_bytes = 0
        self.module_selection: KillRevive | None = None  # Kill-and-Revive: the round's active LoRA modules (None = all)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the strategy (JSON): the DP ledger's histories, the norm references,
        client and module selection, the offsite track's refresh round (its arrays: `state_arrays`)."""
        modules = {"module_selection": self.module_selection.state_dict()} if self.module_selection is not None else {}
        offsite = {"offsite": track_state(self.offsite, self.offsite_aggregator)[0]} if self.offsite is not None else {}
        return {"ledger": self.ledger.state_dict(), "norm_reference": dict(self._norm_reference), "selection": self.selection.state_dict(), **modules, **offsite}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The checkpoint's arrays of the strategy: the offsite track's refresh and server-optimizer moments."""
        return {f"offsite/{k}": v for k, v in track_state(self.offsite, self.offsite_aggregator)[1].items()} if self.offsite is not None else {}

    def load_state_dict(self, state: dict[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
        if self.offsite is not None:
            restore_track(self.offsite, self.offsite_aggregator, state.get("offsite") or {},
                          under(arrays or {}, "offsite/"), self.recorder.config)
        self.ledger.load_state_dict(state.get("ledger", {}))
        self._norm_reference = {str(k): float(v) for k, v in state.get("norm_reference", {}).items()}
        self.selection.load_state_dict(state.get("selection", {}))
        if self.module_selection is not None:
            self.module_selection.load_state_dict(state.get("module_selection") or {})

    # ----------------------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        server_round += self.round_offset
        self._global, self._offsite_global = split_tracks(from_array_record(arrays))
        if self.offsite is not None:
            arrays = to_array_record(self._global)  # LoRA clients get the LoRA track only
        config["train-factors"] = train_factors(self.aggregator.rule, server_round)
        if self.module_selection is not None and not self.module_selection.per_client:  # every client trains and sends the same modules
            config[ACTIVE_KEY] = self.module_selection.message_value(server_round)
        messages = self._select(server_round, list(super().configure_train(server_round, arrays, config, grid)), arrays, grid)
        self._sample_rate = len(messages) / max(1, len(list(grid.get_node_ids())))
        self.recorder.record(sampled=len(messages))
        if self.planner is not None:
            sampled = [m.metadata.dst_node_id for m in messages]
            messages = self.planner.plan_round(server_round, messages, arrays, grid)
            refused = self.directory.adopt((node, self.planner.partition_of(node)) for node in sampled)
        else:
            timeout = min(QUERY_TIMEOUT, float(getattr(self.recorder.config, "round_timeout", QUERY_TIMEOUT)))
            refused = self.directory.query([m.metadata.dst_node_id for m in messages], grid, timeout)
        self.recorder.record(selected=[self.directory.name(m.metadata.dst_node_id) for m in messages])
        for node, reason in refused:  # the node is named by its node id
            self.recorder.record_client({"round": server_round, "phase": "query", "node_id": node, "client_id": node, "status": "rejected", "reason": reason})
        if self.module_selection is not None:  # per-client Kill-and-Revive: each client its own modules
            messages = with_selections(messages, self.module_selection, server_round, self.directory.name)
            self.recorder.record(**self.module_selection.record())
        if self.offsite is not None:
            self._align_offsite(server_round, messages)
            messages = self.offsite.route(messages, self._offsite_records())
        self._kinds = {m.metadata.dst_node_id: str(m.content["config"].get("package-kind", KIND_LORA)) for m in messages}
        self._emulator_nodes |= {node for node, kind in self._kinds.items() if kind == KIND_EMULATOR}
        self._awaited = {m.metadata.dst_node_id for m in messages}
        log.info("round %d: training on %d clients", server_round, len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        started = time.perf_counter()
        server_round += self.round_offset
        rows: list[ReplyRow] = []
        energies: list[Energy] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            row = ReplyRow(node, self.directory.name(node), self._kinds.get(node, KIND_LORA))
            try:
                self._read_reply(msg, row)
            except Exception as err:  # last line of defence: one reply never takes the round down
                row.reply, row.reason = None, self._internal_error(err)
            try:
                energies.append(self._account_energy(msg, row))
            except Exception as err:  # the account never takes a reply (or the round) down
                self._internal_error(err)
            rows.append(row)
            self._awaited.discard(node)
        self.recorder.record(**total_fields(energies), **self.selection.round_record())
        if self.bounds.adaptive and self.client_dp is None:  # DP-FedAvg clips every update instead
            self._norm_reference = bound_norms(rows, self.bounds.norm_multiple, self._norm_reference)
        assign_weights(rows, self.bounds, self._limit_of)
        rejected = [{"client": row.client, "reason": row.reason} for row in rows if not row.accepted]
        for row in rows:
            self.recorder.record_client(client_entry(server_round, row))
            if not row.accepted:
                log.warning("round %d: rejected update from client %d: %s", server_round, row.client, row.reason)
            dp = row.reply.dp if row.reply is not None else row.dp
            if dp is not None:  # the client spent this budget whatever became of its update
                self.recorder.record_privacy(self.ledger.entry(server_round, row.client, row.node_id, dp, row.accepted))
        if self._awaited:  # killed, disconnected or slower than round-timeout: the round goes on without them
            log.warning("round %d: no reply from %d sampled client(s) within round-timeout, dropped: %s", server_round, len(self._awaited), sorted(self._awaited))
            self.recorder.record(dropped=sorted(self._awaited))
        if self.planner is not None:
            self.recorder.record(**self.planner.round_record())

        accepted = [row for row in rows if row.accepted]
        new_global = self._aggregate(server_round, accepted) if accepted else None
        self.recorder.record(train_seconds=time.perf_counter() - self._round_started)  # sent, trained, aggregated
        if new_global is None:
            log.warning("round %d: no valid update; the global adapter stays as it was", server_round)
            self.recorder.record(aggregation=self.aggregator.rule, contributors=[], rejected=rejected, upload_bytes=0, aggregation_seconds=0.0)
            return None, None
        train_loss = weighted((row.reply.metrics.get("train-loss"), row.weight) for row in accepted)
        examples = int(sum(row.examples for row in accepted))
        upload = int(sum(row.reply.metrics.get("upload-bytes", 0) for row in accepted))
        self.recorder.record(
            aggregation=self.aggregator.rule,
            contributors=[row.client for row in accepted],
            rejected=rejected,
            train_loss=train_loss,
            train_examples=examples,
            upload_bytes=upload,
            aggregation_seconds=time.perf_counter() - started,
        )
        log.info("round %d: aggregated %d updates (%d rejected), train loss %s", server_round, len(accepted), len(rejected), "n/a" if train_loss is None else f"{train_loss:.3f}")
        metrics = {"num-examples": examples, "upload-bytes": upload, **({"train-loss": train_loss} if train_loss is not None else {})}
        return to_array_record(new_global), MetricRecord(metrics)

    def _read_reply(self, msg: Message, row: ReplyRow) -> None:
        """Fill `row` from one reply: the checked reply, or why it is rejected."""
        # a HetLoRA client of rank r was sent (and returns) the first r rank directions
        track = self._offsite_global if row.kind == KIND_EMULATOR else self._global
        track = split_base(track)[0]  # clients return LoRA arrays only, never the base-weight update
        base, row.rank = self.planner.base_for(row.node_id, track) if self.planner else (track, 0)
        if self.module_selection is not None and row.kind == KIND_LORA:  # exactly the round's active modules, no more, no less
            base = restrict(base, self.module_selection.current_for(row.client))
        grad_len = len(self.module_selection.modules) if self.module_selection is not None and self.module_selection.gradient and row.kind == KIND_LORA else 0
        outcome = read_train_reply(msg, base, max_update_bytes=self.bounds.max_update_bytes or None, max_norm=self.bounds.absolute_norm, grad_len=grad_len)
        row.metrics, row.dropped = outcome.metrics, outcome.dropped
        if isinstance(outcome, Rejected):
            row.reason, row.dp = outcome.reason, outcome.dp
        else:
            row.reply = outcome
        if self.planner is not None and not msg.has_error():
            late, row.extra = self.planner.check_reply(row.node_id, row.metrics)
            row.reason = row.reason or late
        if row.accepted and row.rank:
            row.reply.update = self.planner.restore(row.reply.update, row.rank)

    def _select(self, server_round: int, sampled: list[Message], arrays: ArrayRecord, grid: Grid) -> list[Message]:
        """Flower's uniform sample, or as many clients chosen energy-aware (same content, other nodes)."""
        self._download_bytes = int(update_megabytes(arrays) * 1e6)
        nodes = list(grid.get_node_ids()) if self.selection.mode != "uniform" else [m.metadata.dst_node_id for m in sampled]
        candidates = candidates_for(nodes, self.planner, grid)
        chosen = self.selection.choose(server_round, candidates, [m.metadata.dst_node_id for m in sampled], update_megabytes(arrays))
        if self.selection.mode == "uniform" or not sampled:
            return sampled
        return self._construct_messages(sampled[0].content, chosen, MessageType.TRAIN)

    def _account_energy(self, msg: Message, row: ReplyRow) -> Energy:
        """The energy of one reply's round from its profile's figures: measured (or simulated) compute
        seconds from the checked metrics, the bytes it was sent and the bytes its reply carries."""
        sent = self.planner.sent_to(row.node_id) if self.planner is not None else None
        profile, download, simulated = sent or (DEFAULT_PROFILE, self._download_bytes, self.directory.partition_of(row.node_id) is not None)
        arrays = msg.content.array_records.get("arrays") if msg.has_content() else None
        upload = sum(len(a.data) for a in arrays.values()) if arrays is not None else 0
        energy, reference = reply_energy(profile, row.metrics, simulated, self.recorder.config, upload, download)
        row.extra.update(energy.fields())
        pid = self.planner.partition_of(row.node_id) if self.planner is not None else -1
        self.selection.spend(pid if pid >= 0 else row.node_id, profile, energy.joules, reference)
        return energy

    def _limit_of(self, row: ReplyRow) -> int | None:
        """The examples the run assigned this client (simulation, a learned partition id), else None."""
        partition = self.directory.partition_of(row.node_id)
        return None if self.assigned_examples is None or partition is None else self.assigned_examples(partition)

    def _aggregate(self, server_round: int, accepted: list[ReplyRow]) -> dict[str, np.ndarray] | None:
        """The new global arrays from the accepted rows (each track with its own rule), or None."""
        by_kind = {kind: [row for row in accepted if row.kind == kind] for kind in (KIND_LORA, KIND_EMULATOR)}
        try:
            new_global = self._aggregate_lora(server_round, by_kind[KIND_LORA]) if by_kind[KIND_LORA] else self._global
            new_offsite = self._offsite_global
            if by_kind[KIND_EMULATOR]:  # offsite updates are averaged only among offsite clients
                group = by_kind[KIND_EMULATOR]
                new_offsite = self.offsite_aggregator(self._offsite_global, [r.reply.update for r in group], [r.weight for r in group], server_round)
        except Exception as err:  # validated input should never get here; the round keeps the old adapter
            log.exception("round %d: aggregation failed (%s)", server_round, type(err).__name__)
            self.recorder.record(aggregation_error=f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
            return None
        if self.offsite is not None:
            self.recorder.record(contributors_by_kind={kind: [r.client for r in group] for kind, group in by_kind.items()})
            new_global = join_tracks(new_global, new_offsite)
        bad = [key for key, value in new_global.items() if not np.all(np.isfinite(value))]
        if bad:
            log.warning("round %d: the aggregate has NaN/Inf in %r; the global adapter stays as it was", server_round, bad[0])
            self.recorder.record(aggregation_error=f"aggregate has NaN/Inf in {bad[0]!r}")
            return None
        return new_global

    def _aggregate_lora(self, server_round: int, group: list[ReplyRow]) -> dict[str, np.ndarray]:
        """The LoRA track's rule (or DP-FedAvg with client-level DP) over its clients' updates."""
        updates, weights = [row.reply.update for row in group], [row.weight for row in group]
        if self.module_selection is None:
            return self._rule(self._global, group, server_round)
        per_key = self.client_dp is None and self.aggregator.rule in MEAN_RULES
        new_global = aggregate_selected(self._global, updates, weights, lambda sub: self._rule(sub, group, server_round), per_key=per_key)
        grads = {row.client: row.reply.grad_norms for row in group}  # kr-score "gradient" (else empty)
        self.module_selection.observe(self._global, new_global, grads)
        self.module_selection.observe_clients(self._global, {row.client: row.reply.update for row in group}, grads)
        return new_global

    def _rule(self, current: dict[str, np.ndarray], group: list[ReplyRow], server_round: int) -> dict[str, np.ndarray]:
        """The rule (or DP-FedAvg) on `current`: the global arrays, or the selected modules' part of them."""
        updates, weights = [row.reply.update for row in group], [row.weight for row in group]
        if self.client_dp is None:
            return self.aggregator(current, updates, weights, server_round)
        new_global, ledger = self.client_dp(current, updates, self._sample_rate)
        for row in group:
            self.recorder.record_privacy({"round": server_round, "client": row.client, "node_id": row.node_id, **ledger})
        self.recorder.record(privacy=ledger)
        return new_global

    def _internal_error(self, err: Exception) -> str:
        """A bug met by a reply: logged (with the traceback the first time per type), never raised."""
        name = type(err).__name__
        if name not in self._errors_logged:
            self._errors_logged.add(name)
            log.exception("internal error reading a reply (%s); it is rejected and the round goes on", name)
        return f"internal error reading reply: {name}"

    def _align_offsite(self, server_round: int, messages: list[Message]) -> None:
        """FedBiOT's per-round alignment of the emulator, if asked and an offsite client trains."""
        config = self.recorder.config
        if getattr(config, "emulator_align_steps", 0) <= 0 or not any(m.content["config"].get("package-kind") == KIND_EMULATOR for m in messages):
            return
        if self._align_batches is None:
            from emulator.cli import distillation_batches

            self._align_batches = distillation_batches(self.offsite.tokenizer, config.emulator_distill_data)
        outcome = self.offsite.align(server_round, self._offsite_global, config, self._align_batches)
        self.recorder.record(emulator_refresh_bytes=outcome["refresh_bytes"])
        if "held" in outcome:
            self.recorder.record(emulator_align_held=outcome["held"])

    def _offsite_records(self) -> Callable[[int], ArrayRecord]:
        """node -> the offsite arrays it trains: the track's global at its package's LoRA rank
        (HetLoRA), one record per rank."""
        if self.planner is None:
            record = to_array_record(self._offsite_global)
            return lambda node: record
        record_at = self.planner.records_by_rank(self._offsite_global)
        return lambda node: record_at(self.planner.rank_for(node))

    # ----------------------------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Federated evaluation of the LoRA track on clients that hold the backbone."""
        self._evaluate_started = time.perf_counter()
        if self.offsite is None:
            messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        else:
            lora = to_array_record(split_tracks(from_array_record(arrays))[0])
            messages = [m for m in super().configure_evaluate(server_round, lora, config, grid) if m.metadata.dst_node_id not in self._emulator_nodes]
        self._evaluating = bool(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted (capped) accuracy and loss of the clients' checked evaluation replies."""
        server_round += self.round_offset
        if self._evaluating:  # federated evaluation on clients: sent, evaluated, replies read
            self.recorder.record(federated_eval_seconds=time.perf_counter() - self._evaluate_started)
        rows: list[EvalReply] = []
        rejected = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            try:
                outcome = read_evaluate_reply(msg)
            except Exception as err:  # last line of defence
                outcome = Rejected(self._internal_error(err))
            if isinstance(outcome, Rejected):
                client = self.directory.name(node)
                rejected.append({"client": client, "reason": outcome.reason})
                self.recorder.record_client({"round": server_round, "phase": "evaluate", "node_id": node, "client_id": client, "status": "rejected", "reason": outcome.reason})
            elif outcome is not None:
                rows.append(outcome)
        if rejected:
            self.recorder.record(federated_eval_rejected=rejected)
        summary = evaluation_summary(rows, self._eval_cap, self.bounds.max_weight_share)
        if summary is None:
            return None
        accuracy, loss = summary
        self.recorder.record(federated_eval_accuracy=accuracy, federated_eval_loss=loss, federated_eval_clients=len(rows))
        return MetricRecord({"eval-accuracy": accuracy, "eval-loss": loss})

    def round_seconds(self) -> float:
        return time.perf_counter() - self._round_started

