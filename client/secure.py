"""The Fedsite ClientApp under secure aggregation: Flower's `secaggplus_mod` around the same training.

Flower 1.41's SecAgg+ server workflow speaks the legacy record layout (FitIns/FitRes inside a
RecordDict), so this app converts with `flwr.compat.common.recorddict_compat` and otherwise
reuses `client_app.local_training` / `local_evaluation`. The mod quantizes, masks and uploads
the arrays this handler returns; the coordinator only ever sees their (weighted) sum.

Since the coordinator cannot check an individual update, the client checks its own before it
is masked: finite, inside the quantization range (else it would be clipped silently), and, with
`--dp client`, clipped to `dp-clip-norm` (as Flower's `fixedclipping_mod` does). A client that
cannot send a valid update raises, which the protocol treats as a dropout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Context, Message, MetricRecord
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import (
    evaluateres_to_recorddict,
    fitres_to_recorddict,
    recorddict_to_evaluateins,
    recorddict_to_fitins,
)

from aggregation.user_dp import clip_delta
from client.client_app import client_id, client_label, local_evaluation, local_training, run_config_from, train_metrics
from finetune.config import FedsiteConfig
from protos.selection import ACTIVE_KEY

log = logging.getLogger("fedsite.client")

# FitIns/EvaluateIns config key carrying the names of the (unnamed) legacy parameter arrays
ARRAY_KEYS = "array-keys"
CLIENT_RECORD = "fedsite.client"  # the MetricRecord with the client's id on every reply (coordinator/secure.py)

Mod = Callable[[Message, Context, Callable], Message]


class UnsendableUpdate(ValueError):
    """This client's update cannot be masked faithfully; it drops out of the round."""


def named_arrays(parameters, config_values: dict) -> dict[str, np.ndarray]:
    """Legacy Parameters + the key list the coordinator sent -> named arrays."""
    keys = json.loads(str(config_values.pop(ARRAY_KEYS)))
    arrays = parameters_to_ndarrays(parameters)
    if len(keys) != len(arrays):
        raise ValueError(f"secure round: {len(arrays)} arrays for {len(keys)} keys")
    return dict(zip(keys, arrays))


def secure_weight(config: FedsiteConfig, examples: int) -> int:
    """The weight the mask carries: examples capped at max-weight; every client max-weight under client DP.

    DP-FedAvg averages clipped updates with equal weights; giving each the largest weight also
    spends all quantization levels on the update.
    """
    if config.dp == "client":
        return int(config.secure_max_weight)
    return int(min(examples, config.secure_max_weight))


def prepare_update(trained: dict[str, np.ndarray], received: dict[str, np.ndarray], config: FedsiteConfig, weight: int) -> dict[str, np.ndarray]:
    """Check (and with client DP clip) this client's update before the mod masks it."""
    bad = [key for key, value in trained.items() if not np.all(np.isfinite(value))]
    if bad:
        raise UnsendableUpdate(f"update has NaN/Inf in {bad[0]!r}; not sending it")
    if config.dp == "client":
        trained, _ = clip_delta(trained, received, config.dp_clip_norm)
    scale = weight / config.secure_max_weight
    peak = max(float(np.max(np.abs(v))) for v in trained.values() if v.size) * scale
    if peak > config.secure_clip_range:
        raise UnsendableUpdate(f"update entry {peak:.4g} (weighted) exceeds secure-clip-range {config.secure_clip_range}; raise it")
    return trained


def secure_train(msg: Message, context: Context) -> Message:
    """Legacy-layout train handler: FitIns in, FitRes out, same local training as the plain app."""
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    values = dict(fitins.config)
    received = named_arrays(fitins.parameters, values)
    selection = values.get(ACTIVE_KEY)  # Kill-and-Revive: every client of the round has the same one
    config, server_round, factors = run_config_from(values)
    # a secure round never reveals a client's gradient norms, whatever the message's config says
    config = dataclasses.replace(config, kr_score="update-norm") if config.kr_score == "gradient" else config
    trained, result, privacy = local_training(config, server_round, factors, received, context, None, selection)  # BudgetExhausted: drop out
    weight = secure_weight(config, result.examples)
    keys = [k for k in received if k in trained]  # the selected modules' arrays, in the coordinator's key order
    update = prepare_update(trained, {k: received[k] for k in keys}, config, weight)
    # upload bytes: 0 here, the coordinator counts what each client sends in every SecAgg+ stage
    metrics = {**train_metrics(result, 0, privacy, context), "secure-weight": weight}
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([update[k] for k in keys]), weight, metrics)
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secure_evaluate(msg: Message, context: Context) -> Message:
    """Legacy-layout evaluate handler (federated evaluation on the client's test split)."""
    evalins = recorddict_to_evaluateins(msg.content, keep_input=True)
    values = dict(evalins.config)
    arrays = named_arrays(evalins.parameters, values)
    config, _, _ = run_config_from(values)
    metrics = local_evaluation(config, arrays, context)
    res = EvaluateRes(Status(Code.OK, "ok"), float(metrics.get("eval-loss", 0.0)), int(metrics["num-examples"]), metrics)
    return Message(evaluateres_to_recorddict(res), reply_to=msg)


def dropout_mod(partition_ids: Iterable[int], stage: str = Stage.COLLECT_MASKED_VECTORS) -> Mod:
    """A mod that makes the given simulated clients go silent at one SecAgg+ stage.

    For simulations and benchmarks of dropouts: the default stage (after the keys are shared,
    before the masked update is sent) is the one that needs the survivors' key shares to recover.
    """
    dropping = {int(p) for p in partition_ids}

    def mod(msg: Message, context: Context, call_next: Callable) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and configs.get(Key.STAGE) == stage and int(context.node_config.get("partition-id", -1)) in dropping:
            raise ConnectionError(f"simulated dropout of client {client_label(context)} at stage {stage}")
        return call_next(msg, context)

    return mod


def identity_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Tag every reply with this client's id, so the coordinator can name who dropped out at which stage."""
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content.metric_records[CLIENT_RECORD] = MetricRecord({"client-id": client_id(context)})
    return reply


def secure_mods(*outer_mods: Mod) -> list[Mod]:
    """The mod stack of the secure app; `outer_mods` (e.g. `dropout_mod`) run just before SecAgg+."""
    return [identity_mod, *outer_mods, secaggplus_mod]


def secure_client_app(*outer_mods: Mod) -> ClientApp:
    """The secure ClientApp: legacy-layout handlers under `secure_mods(*outer_mods)`."""
    client = ClientApp(mods=secure_mods(*outer_mods))
    client.train()(secure_train)
    client.evaluate()(secure_evaluate)
    return client


app = secure_client_app()
