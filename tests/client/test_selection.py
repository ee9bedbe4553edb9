"""Kill-and-Revive on the client (tiny Llama): killed modules frozen and left out of the reply,
hostile selections refused."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import recorddict_to_fitres

from client.client_app import train_handler
from client.secure import secure_train
from client.selection import apply_selection, grad_norms_metric, probe_groups
from finetune.cache import initial_lora_arrays, lora_model
from finetune.config import FedsiteConfig
from finetune.lora import set_trainable_factors
from finetune.train import TrainSettings, train
from finetune.sources import client_splits
from protos.selection import ACTIVE_KEY, GRAD_NORMS_KEY, SelectionError, encode_selection, keys_of, module_of, modules_of
from protos.tensors import from_array_record, to_array_record
from protos.updates import decode_update
from tests.client.test_secure import context as secure_context
from tests.client.test_secure import fit_message, small

pytestmark = pytest.mark.usefixtures("serverapp_identity")

CONFIG = FedsiteConfig(model="tiny", clients=2, train_per_task=4, test_per_task=2, local_steps=2, batch_size=2, module_selection="kill-revive")


def initial() -> dict:
    return initial_lora_arrays(CONFIG.model, CONFIG.lora_settings(), CONFIG.seed)


def top_modules() -> list[str]:
    return [m for m in modules_of(initial()) if ".layers.3." in m]


def message(selection: object) -> Message:
    config = {**CONFIG.to_flat(), "server-round": 1, **({ACTIVE_KEY: selection} if selection is not None else {})}
    return Message(content=RecordDict({"arrays": to_array_record(initial()), "config": ConfigRecord(config)}), dst_node_id=5, message_type="train")


def context(tmp_path) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)}, state=RecordDict(), run_config={})


def test_killed_modules_are_frozen_and_no_graph_is_recorded_below_the_lowest_active_one():
    model, tokenizer = lora_model(CONFIG.model, CONFIG.lora_settings(), CONFIG.seed)
    active = apply_selection(model, encode_selection(top_modules()))
    try:
        assert active == top_modules()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".layers.3." in n and "lora_" in n for n in trainable)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        needs_grad: dict[int, bool] = {}

        def watch(i: int):
            def hook(module, inputs, output) -> None:
                needs_grad.setdefault(i, (output[0] if isinstance(output, tuple) else output).requires_grad)
            return hook

        hooks = [layer.register_forward_hook(watch(i)) for i, layer in enumerate(model.base_model.model.model.layers)]
        try:
            train(model, tokenizer, client_splits(CONFIG, {"partition-id": 0, "num-partitions": 2})[0], TrainSettings(steps=2, batch_size=2))
        finally:
            for hook in hooks:
                hook.remove()
        assert needs_grad == {0: False, 1: False, 2: False, 3: True}  # backward starts and ends in block 3
        for name, param in model.named_parameters():
            if "lora_" in name:
                assert torch.equal(param, before[name]) != (name in trainable), name  # only the active ones moved
                assert (param.grad is None) == (name not in trainable), name
    finally:
        set_trainable_factors(model, "AB")


def test_the_reply_carries_exactly_the_selected_modules(tmp_path):
    reply = train_handler(message(encode_selection(top_modules())), context(tmp_path))
    assert "declined" not in reply.content.config_records
    sent = {k: initial()[k] for k in keys_of(initial(), top_modules())}
    update = decode_update(from_array_record(reply.content["arrays"]), sent)
    assert set(update) == set(sent)
    assert all(not np.array_equal(update[k], sent[k]) for k in sent if "lora_B" in k)  # B trained away from zero
    full = {k: v.nbytes for k, v in initial().items()}
    assert reply.content["metrics"]["upload-bytes"] < sum(full.values()) / 2  # 2 of 8 modules


@pytest.mark.parametrize("selection", ["[]", json.dumps(["base_model.model.model.layers.9.self_attn.q_proj"]), "{", 7, json.dumps([1, 2])])
def test_a_hostile_selection_is_declined_before_training_and_leaves_the_model_as_it_was(tmp_path, selection):
    reply = train_handler(message(selection), context(tmp_path))
    assert "active-modules" in reply.content["declined"]["reason"] and "arrays" not in reply.content.array_records
    model, _ = lora_model(CONFIG.model, CONFIG.lora_settings(), CONFIG.seed)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # the cached model is not left frozen
    with pytest.raises(SelectionError):
        apply_selection(model, selection)


def test_the_secure_handler_masks_only_the_selected_arrays_in_key_order():
    config = small(module_selection="kill-revive")
    arrays = initial_lora_arrays(config.model, config.lora_settings(), config.seed)
    msg = fit_message(config, arrays)
    msg.content["fitins.config"][ACTIVE_KEY] = encode_selection(top_modules())
    res = recorddict_to_fitres(secure_train(msg, secure_context()).content, keep_input=True)
    sent = parameters_to_ndarrays(res.parameters)
    keys = keys_of(arrays, top_modules())
    assert [a.shape for a in sent] == [arrays[k].shape for k in keys]
    msg = fit_message(small(module_selection="kill-revive", kr_score="gradient", secure=False), arrays)  # a coordinator asking for gradient norms
    msg.content["fitins.config"][ACTIVE_KEY] = encode_selection(top_modules())
    assert GRAD_NORMS_KEY not in recorddict_to_fitres(secure_train(msg, secure_context()).content, keep_input=True).metrics


def test_a_gradient_probe_measures_every_module_at_the_first_step_and_steps_only_the_active_ones():
    model, tokenizer = lora_model(CONFIG.model, CONFIG.lora_settings(), CONFIG.seed)
    active = apply_selection(model, encode_selection(top_modules()))
    examples = client_splits(CONFIG, {"partition-id": 0, "num-partitions": 2})[0]
    try:
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        plain_flops = train(model, tokenizer, examples, TrainSettings(steps=2, batch_size=2, seed=3)).flops
        with torch.no_grad():  # back to the same start, so both runs take the same first step
            for name, param in model.named_parameters():
                if name in before:
                    param.copy_(before[name])
        result = train(model, tokenizer, examples, TrainSettings(steps=2, batch_size=2, seed=3), probe=probe_groups(model))
        modules = modules_of(initial())
        assert list(result.probe_norms) == sorted(modules)
        assert all(result.probe_norms[m] > 0 for m in modules)  # B's gradient, killed modules included
        for name, param in model.named_parameters():
            if "lora_" in name:
                moved = not torch.equal(param, before[name])
                assert moved == (module_of(name) in active) == param.requires_grad, name  # killed: measured, never stepped, frozen again
                assert (param.grad is None) == (module_of(name) not in active), name
        assert result.flops > plain_flops  # the first step's backward reached block 0
    finally:
        set_trainable_factors(model, "AB")


def test_a_gradient_run_replies_with_one_norm_per_module_and_a_plain_run_with_none(tmp_path):
    def reply(**changes):
        config = {**CONFIG.to_flat(), **changes, "server-round": 1, ACTIVE_KEY: encode_selection(top_modules())}
        msg = Message(content=RecordDict({"arrays": to_array_record(initial()), "config": ConfigRecord(config)}), dst_node_id=5, message_type="train")
        return train_handler(msg, context(tmp_path)).content["metrics"]

    norms = reply(**{"kr-score": "gradient"})[GRAD_NORMS_KEY]
    assert len(norms) == len(modules_of(initial())) and all(v > 0 for v in norms)
    assert GRAD_NORMS_KEY not in reply()
    model = lora_model(CONFIG.model, CONFIG.lora_settings(), CONFIG.seed)[0]
    b_only = lambda groups: all(len(ps) == 1 and ps[0] is dict(model.named_parameters())[n] for m, ps in groups.items() for n in [f"{m}.lora_B.default.weight"])  # noqa: E731
    assert b_only(probe_groups(model, "B"))  # FFA-LoRA trains only B: only B is probed
    assert all(len(ps) == 2 for ps in probe_groups(model, "A").values())  # RoLoRA's A rounds probe B too (A's gradient is 0 where B is)
    low = probe_groups(model, "AB", lowest_block=3)
    assert list(low) == sorted(modules_of(initial())) and all((len(ps) == 2) == (".layers.3." in m) for m, ps in low.items())
    assert grad_norms_metric({"b": 1.0, "a": 2.0}) == {GRAD_NORMS_KEY: [2.0, 1.0]}
    assert grad_norms_metric({"a": 1.0, "b": float("inf")}) == {} and grad_norms_metric({}) == {}  # an overflow costs the score, not the update
