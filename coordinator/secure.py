"""Secure aggregation at the coordinator: Flower's SecAgg+ workflow around a legacy strategy.

Flower 1.41's `SecAggPlusWorkflow` runs only inside `DefaultWorkflow` with a `LegacyContext`
holding a legacy `flwr.server.strategy` strategy, so the secure path lives here, behind one
call (`run_secure`), while the plain path stays on the Message API. Both share the recorder,
the central evaluation and the adapter export (`coordinator/server_app.py`).

What the coordinator sees: the weighted mean of the survivors' arrays, unmasked and
dequantized by the workflow (each client's weight is its example count, capped at
`secure-max-weight`; under client DP every client has the same weight). Per-update validation
becomes client-side checks (finite, inside the quantization range, clipped under client DP;
see `client/secure.py`) plus a check that the unmasked mean is finite and shaped like the
global adapter. Frozen LoRA factors (FFA-LoRA's A, RoLoRA's other factor) are restored from the
global adapter, so those rules stay exact under masking; the other factors carry quantization
error of about `clip_range * 2 / quantization_range / mean weight share` per entry.

Per round the recorder gets who contributed, who dropped out at which stage and why, bytes
received in each protocol stage, seconds per stage, and `secure_halted` with the reason when
too few clients survived to unmask (the global adapter then stays as it was). Energy and carbon
are counted per contributor as on the plain path (coordinator/energy.py, the default device
profile: there is no population on this path), from its reported compute seconds, the bytes it
sent in every SecAgg+ stage and the adapter it was sent.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from aggregation.lora import factor_keys
from aggregation.partial import merge, subset
from coordinator.aggregate import Aggregator, train_factors
from coordinator.client_dp import ClientLevelDP
from coordinator.directory import ClientDirectory
from coordinator.energy import Energy, reply_energy, total_fields
from coordinator.ledger import PrivacyLedger
from coordinator.module_selection import selection_for
from coordinator.replies import TRAIN_METRICS, Rejected, error_text, read_dp, read_evaluate_metrics, read_metrics, record_fields
from coordinator.results import RunRecorder
from coordinator.round_bounds import evaluation_summary, weighted
from finetune.config import FedsiteConfig
from protos.profile import DEFAULT_PROFILE
from protos.selection import ACTIVE_KEY, keys_of

log = logging.getLogger("fedsite.coordinator")

NamedArrays = dict[str, np.ndarray]
# (server_round, arrays, round_seconds) -> {"eval-accuracy", "eval-loss"}; closes the round in the recorder
EvaluateRound = Callable[[int, NamedArrays, "float | None"], dict]
ARRAY_KEYS = "array-keys"  # the names of the legacy (unnamed) parameter arrays; read by client/secure.py
CLIENT_RECORD = "fedsite.client"  # client/secure.py tags each reply with the client's id here


def share_parameters(config: FedsiteConfig) -> tuple[int | float, int | float]:
    """(num_shares, reconstruction_threshold) as SecAggPlusWorkflow wants them: a share if <= 1, else a count."""

    def as_param(value: float) -> int | float:
        return float(value) if value <= 1 else int(value)

    shares = as_param(config.secure_num_shares)
    if isinstance(shares, int) and shares % 2 == 0:
        # a client shares with k/2 neighbours on each side plus itself: the count is odd. Flower 1.41
        # rounds an even count up only after telling clients the even one, and they fail in share_keys.
        log.info("secure-num-shares %d rounded up to %d (SecAgg+ neighbourhoods are odd)", shares, shares + 1)
        shares += 1
    return shares, as_param(config.secure_threshold)


def message_nbytes(msg: Message) -> int:
    """Bytes of a message's records, as Flower's `message_size_mod` counts them."""
    return 0 if msg.has_error() else sum(record.count_bytes() for record in msg.content.values())


class CountingGrid:
    """A Grid that passes everything through and counts, per round, the replies of each SecAgg+ stage.

    The workflow hides individual replies from the strategy; this is how the round learns
    bytes received, and which client dropped out at which stage with what error.
    """

    def __init__(self, grid: Grid, clients: int = 0) -> None:
        self._grid = grid
        # node -> name: the partition id of the node's first tag if in [0, clients) and no other node's, else the node id
        self.directory = ClientDirectory(clients)
        self.reset()


    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def reset(self) -> None:
        self.stage_bytes: dict[str, int] = defaultdict(int)
        self.node_bytes: dict[int, int] = defaultdict(int)
        self.dropped: dict[int, tuple[str, str]] = {}  # node -> (stage, reason)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stages = {m.metadata.dst_node_id: stage_of(m) for m in messages}
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            stage = stages.get(node, "other")
            if reply.has_error() or not reply.has_content():
                text = error_text(getattr(reply.error, "reason", None)) if reply.has_error() else None
                self.dropped.setdefault(node, (stage, f"client error: {text}" if text else "client error (no reason given)"))
                continue
            # the SecAgg+ ClientApp answers no query: its tag is its who-am-I answer, taken once per node
            tag = reply.content.metric_records.get(CLIENT_RECORD)
            claimed = tag.get("client-id") if tag is not None else None
            if not self.directory.knows(node) and isinstance(claimed, int) and not isinstance(claimed, bool):
                self.directory.learn(node, claimed)
            size = message_nbytes(reply)
            self.stage_bytes[stage] += size
            self.node_bytes[node] += size
        for node in set(stages) - answered:
            self.dropped.setdefault(node, (stages[node], "no reply before the timeout"))
        return replies


def stage_of(msg: Message) -> str:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(configs.get(Key.STAGE, "other")) if configs is not None else str(msg.metadata.message_type)


class RecordedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, timing each stage and recording why a round halted."""

    def __init__(self, recorder: RunRecorder, grid: CountingGrid, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recorder = recorder
        self.counter = grid

    def __call__(self, grid: Grid, context: Context) -> None:
        state = WorkflowState()
        steps = (self.setup_stage, self.share_keys_stage, self.collect_masked_vectors_stage, self.unmask_stage)
        seconds: dict[str, float] = {}
        for step in steps:
            started = time.perf_counter()
            ok = step(self.counter, context, state)
            seconds[step.__name__.removesuffix("_stage")] = time.perf_counter() - started
            if not ok:
                self._halted(step.__name__.removesuffix("_stage"), state, context)
                break
        self.recorder.record(secure_stage_seconds=seconds, secure_stage_bytes=dict(self.counter.stage_bytes), upload_bytes=sum(self.counter.stage_bytes.values()))
        if "unmask" in seconds and ok:
            self.recorder.record(aggregation_seconds=seconds["unmask"])

    def _halted(self, stage: str, state: WorkflowState, context: Context) -> None:
        """Record a round the protocol refused to finish; the global adapter stays as it was."""
        alive, needed = len(state.active_node_ids), state.threshold
        reason = f"secure aggregation halted at stage {stage}: {alive} of {len(state.sampled_node_ids)} sampled clients left, {needed} needed to unmask"
        log.warning("%s; the global adapter stays as it was", reason)
        name = self.counter.directory.name
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        rejected = dropouts(self.counter)
        masked = [proxy.node_id for proxy, _ in state.legacy_results if proxy.node_id not in self.counter.dropped]
        rejected += [{"client": name(node), "node_id": node, "stage": stage, "reason": f"masked update discarded: {reason}"} for node in masked]
        for entry in rejected:
            self.recorder.record_client({"round": server_round, **entry, "status": "rejected"})
        self.recorder.record(secure_halted=reason, contributors=[], rejected=rejected)


def dropouts(counter: CountingGrid) -> list[dict]:
    """This round's dropouts: client (id, or node id if it never answered), stage and reason."""
    return [{"client": counter.directory.name(node), "node_id": node, "stage": stage, "reason": reason} for node, (stage, reason) in counter.dropped.items()]


def check_sum(mean: NamedArrays, current: NamedArrays) -> str | None:
    """Why the unmasked mean cannot be used, or None (the only validation left under masking)."""
    for key, ref in current.items():
        if key not in mean or mean[key].shape != ref.shape:
            return f"unmasked sum: {key!r} has shape {getattr(mean.get(key), 'shape', None)}, expected {ref.shape}"
        if not np.all(np.isfinite(mean[key])):
            return f"unmasked sum: {key!r} has NaN/Inf"
    return None


def restore_frozen(mean: NamedArrays, current: NamedArrays, trained: str) -> NamedArrays:
    """Put back the exact global values of factors no client trained (they only carry quantization error)."""
    out = {k: v.astype(current[k].dtype) for k, v in mean.items()}
    for factor in "AB":
        if factor not in trained:
            out.update({k: np.array(current[k], copy=True) for k in factor_keys(current, factor)})
    return out


class SecureStrategy(LegacyFedAvg):
    """Legacy FedAvg sampling; aggregation of the unmasked mean through the run's rule, recorded."""

    def __init__(
        self, config: FedsiteConfig, recorder: RunRecorder, initial: NamedArrays, evaluate_round: EvaluateRound, counter: CountingGrid, client_dp: ClientLevelDP | None
    ) -> None:
        min_clients = max(2, min(config.min_train_clients, config.clients))
        super().__init__(
            fraction_fit=config.fraction_train,
            fraction_evaluate=config.fraction_evaluate,
            min_fit_clients=min_clients,
            min_evaluate_clients=1,
            min_available_clients=min_clients,
            initial_parameters=ndarrays_to_parameters(list(initial.values())),
            on_fit_config_fn=self._round_config,
            on_evaluate_config_fn=self._round_config,
        )
        self.config = config
        self.recorder = recorder
        self.keys = list(initial)
        self.current = dict(initial)
        self.evaluate_round = evaluate_round
        self.counter = counter
        self.aggregator = Aggregator(config.aggregation, config.server_lr, config.server_momentum, config.trim_fraction)
        self.client_dp = client_dp
        self._started = 0.0
        self._sample_rate = 1.0
        self.ledger = PrivacyLedger(config.delta)
        # Kill-and-Revive: one selection per round for every client, so the masked vectors line up
        self.module_selection = selection_for(config, initial)

    def _round_config(self, server_round: int) -> dict:
        factors = train_factors(self.config.aggregation, server_round)
        selection = {ACTIVE_KEY: self.module_selection.message_value(server_round)} if self.module_selection is not None else {}
        return {**self.config.to_flat(), "server-round": server_round, "train-factors": factors, ARRAY_KEYS: json.dumps(self.keys), **selection}

    def arrays(self, parameters: Parameters, keys: list[str] | None = None) -> NamedArrays:
        return dict(zip(self.keys if keys is None else keys, parameters_to_ndarrays(parameters)))

    def sent_keys(self) -> list[str]:
        """The keys clients masked this round: every key, or the active modules' (in key order)."""
        return self.keys if self.module_selection is None else keys_of(self.keys, self.module_selection.current)

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[override]
        self._started = time.perf_counter()
        self.counter.reset()
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self._sample_rate = len(instructions) / max(1, client_manager.num_available())
        self.recorder.record(sampled=len(instructions), secure=True, **(self.module_selection.record() if self.module_selection is not None else {}))
        log.info("round %d: secure aggregation over %d clients", server_round, len(instructions))
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list) -> tuple[Parameters | None, dict]:
        """`results` all carry the same unmasked weighted mean; their metrics are the clients' own."""
        started = time.perf_counter()
        contributors = [self.counter.directory.name(proxy.node_id) for proxy, _ in results]
        rejected = dropouts(self.counter)
        for entry in rejected:
            self.recorder.record_client({"round": server_round, **entry, "status": "rejected"})
        keys = self.sent_keys()
        current = subset(self.current, keys)
        problem = "no client survived to the masked upload" if not results else check_sum(self.arrays(results[0][1].parameters, keys), current)
        self.recorder.record(train_seconds=time.perf_counter() - self._started)  # the SecAgg+ stages up to the unmasked sum
        checked = [read_metrics(res.metrics, TRAIN_METRICS) for _, res in results]  # each client's own metrics: checked, never trusted
        energies = [self._energy(proxy.node_id, metrics if reason is None else {}) for (proxy, _), (metrics, _, reason) in zip(results, checked)]
        if problem:  # the clients spent the energy all the same
            log.warning("round %d: %s; the global adapter stays as it was", server_round, problem)
            discarded = [{"client": c, "node_id": p.node_id, "stage": "unmask", "reason": f"masked update discarded: {problem}"} for (p, _), c in zip(results, contributors)]
            for entry, energy in zip(discarded, energies):
                self.recorder.record_client({"round": server_round, **entry, "status": "rejected", **energy.fields()})
            self.recorder.record(aggregation=self.aggregator.rule, contributors=[], rejected=rejected + discarded, secure_halted=problem, **total_fields(energies))
            return None, {}
        factors = train_factors(self.config.aggregation, server_round)
        mean = restore_frozen(self.arrays(results[0][1].parameters, keys), current, factors)
        if self.client_dp is not None:
            new, ledger = self.client_dp.release(current, mean, len(results), self._sample_rate)
            for client in contributors:
                self.recorder.record_privacy({"round": server_round, "client": client, **ledger, "secure": True})
            self.recorder.record(privacy=ledger)
        else:
            new = self.aggregator(current, [mean], [1.0], server_round)
        new = merge(self.current, new)  # modules outside the selection stay exactly as they were
        if self.module_selection is not None:
            self.module_selection.observe(self.current, new)
        self.current = {k: np.asarray(new[k], dtype=self.current[k].dtype) for k in self.keys}
        examples = []
        for (proxy, res), client, (metrics, _, reason), energy in zip(results, contributors, checked, energies):
            dp, dp_reason = read_dp(metrics) if reason is None else (None, None)
            reason = reason or dp_reason
            weight = min(float(metrics.get("num-examples", 0)), self.config.secure_max_weight, float(self.config.max_client_examples or math.inf))
            examples.append((metrics.get("train-loss") if reason is None else None, weight))
            entry = {"round": server_round, "node_id": proxy.node_id, "client_id": client, **record_fields(metrics)}
            entry.update({"upload_bytes": self.counter.node_bytes.get(proxy.node_id, 0), "status": "accepted"})
            if reason is not None:  # its masked update is in the sum already; its metrics are not used
                entry["metrics_rejected"] = reason
            entry.update(energy.fields())
            self.recorder.record_client(entry)
            if dp is not None:  # local DP-SGD composes with masking: same ledger as the plain path
                self.recorder.record_privacy({**self.ledger.entry(server_round, client, proxy.node_id, dp), "secure": True})
        train_loss = weighted(examples)
        self.recorder.record(
            aggregation=self.aggregator.rule,
            contributors=sorted(contributors),
            rejected=rejected,
            train_loss=train_loss,
            train_examples=int(sum(w for _, w in examples)),
            secure_masked_bytes=self.counter.stage_bytes.get("collect_masked_vectors", 0),
            aggregation_seconds=time.perf_counter() - started,
            **total_fields(energies),
        )
        log.info("round %d: unmasked the sum of %d updates (%d dropped out), train loss %s", server_round, len(results), len(rejected), "n/a" if train_loss is None else f"{train_loss:.3f}")
        return ndarrays_to_parameters([self.current[k] for k in self.keys]), {}

    def _energy(self, node: int, metrics: dict) -> Energy:
        """A contributor's round on the default profile: its (checked) compute seconds, every byte it
        sent through the SecAgg+ stages, and the global adapter it was sent."""
        simulated = self.counter.directory.partition_of(node) is not None
        download = sum(int(v.nbytes) for v in self.current.values())
        return reply_energy(DEFAULT_PROFILE, metrics, simulated, self.config, self.counter.node_bytes.get(node, 0), download)[0]

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict] | None:
        seconds = time.perf_counter() - self._started if server_round else None
        metrics = self.evaluate_round(server_round, self.arrays(parameters), seconds)
        return float(metrics["eval-loss"]), metrics

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[float | None, dict]:
        rows = []
        for proxy, res in results:
            outcome = read_evaluate_metrics({**res.metrics, "num-examples": res.num_examples})
            if isinstance(outcome, Rejected):
                client = self.counter.directory.name(proxy.node_id)
                self.recorder.record_client({"round": server_round, "phase": "evaluate", "node_id": proxy.node_id, "client_id": client, "status": "rejected", "reason": outcome.reason})
            elif outcome is not None:
                rows.append(outcome)
        cap = min(c for c in (self.config.max_client_examples, self.config.client_eval_examples, math.inf) if c > 0)
        summary = evaluation_summary(rows, 0 if math.isinf(cap) else int(cap), self.config.max_weight_share)
        if summary is None:
            return None, {}
        accuracy, loss = summary
        self.recorder.record(federated_eval_accuracy=accuracy, federated_eval_loss=loss, federated_eval_clients=len(rows))
        return loss, {"eval-accuracy": accuracy}


def run_secure(grid: Grid, config: FedsiteConfig, recorder: RunRecorder, initial: NamedArrays, evaluate_round: EvaluateRound) -> NamedArrays:
    """Federate `config.num_server_rounds` rounds through SecAgg+; return the final global arrays."""
    counter = CountingGrid(grid, config.clients)
    from coordinator.server_app import client_level_dp  # server_app imports this module lazily

    strategy = SecureStrategy(config, recorder, initial, evaluate_round, counter, client_level_dp(config))
    num_shares, threshold = share_parameters(config)
    secagg = RecordedSecAggPlus(
        recorder,
        counter,
        num_shares=num_shares,
        reconstruction_threshold=threshold,
        max_weight=config.secure_max_weight,
        clipping_range=config.secure_clip_range,
        quantization_range=config.secure_quantization_range,
        timeout=config.round_timeout,
    )
    base = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, config=ServerConfig(num_rounds=config.num_server_rounds, round_timeout=config.round_timeout), strategy=strategy)
    DefaultWorkflow(fit_workflow=secagg)(counter, context)
    return strategy.current
