"""The secure ClientApp's handlers and mods, called directly on the tiny Llama (no protocol, no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import evaluateins_to_recorddict, fitins_to_recorddict, recorddict_to_evaluateres, recorddict_to_fitres

from aggregation.lora import factor_keys
from aggregation.validate import global_l2_norm
from client.secure import CLIENT_RECORD, UnsendableUpdate, dropout_mod, identity_mod, prepare_update, secure_evaluate, secure_train, secure_weight
from finetune.cache import initial_lora_arrays
from finetune.config import FedsiteConfig

pytestmark = pytest.mark.usefixtures("serverapp_identity")


def small(**changes) -> FedsiteConfig:
    base = dict(model="tiny", secure=True, clients=2, local_steps=2, batch_size=2, train_per_task=4, test_per_task=1, max_new_tokens=2, client_eval_examples=2, secure_max_weight=50.0)
    return FedsiteConfig(**{**base, **changes}).validate()


def context(partition: int = 0) -> Context:
    return Context(run_id=7, node_id=1000 + partition, node_config={"partition-id": partition, "num-partitions": 2}, state=RecordDict(), run_config={})


def fit_message(config: FedsiteConfig, arrays: dict, factors: str = "AB") -> Message:
    """The train message SecAgg+ forwards to the handler: FitIns in the legacy layout."""
    values = {**config.to_flat(), "server-round": 1, "train-factors": factors, "array-keys": json.dumps(list(arrays))}
    content = fitins_to_recorddict(FitIns(ndarrays_to_parameters(list(arrays.values())), values), keep_input=True)
    return Message(content, dst_node_id=1000, message_type=MessageType.TRAIN)


def train_reply(config: FedsiteConfig, factors: str = "AB"):
    initial = initial_lora_arrays(config.model, config.lora_settings(), config.seed)
    reply = secure_train(fit_message(config, initial, factors), context())
    res = recorddict_to_fitres(reply.content, keep_input=True)
    return initial, dict(zip(initial, parameters_to_ndarrays(res.parameters))), res


def test_secure_train_returns_trained_arrays_in_the_legacy_layout():
    config = small()
    initial, trained, res = train_reply(config)
    assert list(trained) == list(initial) and all(trained[k].shape == initial[k].shape for k in initial)
    assert global_l2_norm(trained, initial) > 0  # it trained
    assert res.num_examples == res.metrics["secure-weight"] == min(res.metrics["num-examples"], 50)
    assert res.metrics["client-id"] == 0 and res.metrics["steps"] == 2


def test_frozen_factor_comes_back_unchanged():
    initial, trained, _ = train_reply(small(aggregation="ffa-lora"), factors="B")
    for key in factor_keys(initial, "A"):
        assert np.array_equal(trained[key], initial[key])


def test_client_dp_clips_its_own_update_and_takes_the_full_weight():
    config = small(dp="client", dp_clip_norm=1e-3, lr=0.05)
    initial, trained, res = train_reply(config)
    assert global_l2_norm(trained, initial) == pytest.approx(1e-3, rel=1e-3)  # clipped to the bound
    assert res.num_examples == 50  # equal weights: DP-FedAvg's unweighted mean


def test_an_update_that_cannot_be_masked_faithfully_is_not_sent():
    rng = np.random.default_rng(0)
    received = {"x.lora_A.weight": rng.normal(size=(2, 4)).astype(np.float32), "x.lora_B.weight": np.zeros((4, 2), np.float32)}
    config = small(secure_clip_range=0.5)
    with pytest.raises(UnsendableUpdate, match="secure-clip-range"):
        prepare_update({k: v * 10 for k, v in received.items()}, received, config, weight=50)
    assert prepare_update({k: v * 10 for k, v in received.items()}, received, config, weight=1) is not None  # weight 1/50 shrinks it in range
    with pytest.raises(UnsendableUpdate, match="NaN"):
        prepare_update({**received, "x.lora_B.weight": np.full((4, 2), np.nan, np.float32)}, received, config, weight=1)
    assert secure_weight(config, 80) == 50 and secure_weight(config, 20) == 20


def test_secure_evaluate_answers_in_the_legacy_layout():
    config = small()
    initial = initial_lora_arrays(config.model, config.lora_settings(), config.seed)
    values = {**config.to_flat(), "server-round": 1, "train-factors": "AB", "array-keys": json.dumps(list(initial))}
    msg = Message(evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters(list(initial.values())), values), keep_input=True), dst_node_id=1000, message_type=MessageType.EVALUATE)
    res = recorddict_to_evaluateres(secure_evaluate(msg, context()).content)
    assert res.num_examples == res.metrics["num-examples"] > 0 and res.loss == pytest.approx(res.metrics["eval-loss"])


def stage_message(stage: str) -> Message:
    return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage})}), dst_node_id=1000, message_type=MessageType.TRAIN)


def test_dropout_mod_silences_only_the_chosen_clients_at_the_chosen_stage():
    mod = dropout_mod({1})

    def echo(msg, ctx):
        return Message(RecordDict(), reply_to=msg)

    assert mod(stage_message(Stage.COLLECT_MASKED_VECTORS), context(0), echo) is not None
    assert mod(stage_message(Stage.SETUP), context(1), echo) is not None
    with pytest.raises(ConnectionError, match="client 1"):
        mod(stage_message(Stage.COLLECT_MASKED_VECTORS), context(1), echo)


def test_identity_mod_tags_every_reply_with_the_client_id():
    reply = identity_mod(stage_message(Stage.SETUP), context(1), lambda msg, ctx: Message(RecordDict(), reply_to=msg))
    assert reply.content.metric_records[CLIENT_RECORD]["client-id"] == 1
