import copy

import numpy as np
import pytest
import torch

from emulator.build import (
    adapter_state,
    attach_adapter_lora,
    build_emulator,
    decoder_layers,
    load_adapter_state,
    plug_in,
)
from emulator.layers import make_layer_map
from finetune.lora import LoraSettings, attach_lora
from tests.emulator.conftest import logits

ATOL = 1e-5


def train_step(model, batch, lr=1e-2):
    """One SGD step on the LM loss over whatever is trainable."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= lr * torch.sign(p.grad)  # sign step: moves every weight, visibly
            p.grad = None
    model.eval()


def test_emulator_has_only_the_kept_blocks(tiny8, map8, batch):
    full = tiny8[0]
    before = {k: v.clone() for k, v in full.state_dict().items()}
    emulator = build_emulator(full, map8)
    assert len(decoder_layers(emulator)) == 6 and emulator.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in decoder_layers(emulator)] == list(range(6))
    for position, original in enumerate(map8.emulator_layers()):
        for (name, a), b in zip(decoder_layers(emulator)[position].state_dict().items(), decoder_layers(full)[original].state_dict().values()):
            assert torch.equal(a, b), name
    assert logits(emulator, batch).shape == logits(full, batch).shape
    # the backbone is untouched and shares no storage with the emulator
    assert full.config.num_hidden_layers == 8 and len(decoder_layers(full)) == 8
    assert all(torch.equal(v, before[k]) for k, v in full.state_dict().items())
    full_ptrs = {p.data_ptr() for p in full.parameters()}
    assert not full_ptrs & {p.data_ptr() for p in emulator.parameters()}


def test_only_adapter_blocks_train(tiny8, map8):
    emulator = build_emulator(tiny8[0], map8)
    trainable = {n.split(".")[2] for n, p in emulator.named_parameters() if p.requires_grad}
    assert trainable == {"0", "1", "4", "5"}  # emulator positions of original 0, 1, 6, 7
    assert all(n.startswith("model.layers.") for n, p in emulator.named_parameters() if p.requires_grad)


def test_kv_cache_generation_matches_no_cache(tiny8, map8):
    model, tokenizer = tiny8
    emulator = build_emulator(model, map8)
    ids = tokenizer(["hello there"], return_tensors="pt")
    cached = emulator.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = emulator.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_stride_one_emulator_equals_full_model(tiny8, batch):
    lm = make_layer_map(8, 2, 1)
    emulator = build_emulator(tiny8[0], lm)
    assert lm.dropped() == ()
    torch.testing.assert_close(logits(emulator, batch), logits(tiny8[0], batch), atol=ATOL, rtol=0)


def test_plug_in_after_training_equals_full_model_with_same_blocks(tiny8, batch):
    full = tiny8[0]
    lm = make_layer_map(8, 2, 1)
    emulator = build_emulator(full, lm)
    train_step(emulator, batch)
    changed = adapter_state(emulator, lm)
    original = adapter_state(full, lm)
    assert any(not np.array_equal(changed[k], original[k]) for k in changed)
    plugged = plug_in(full, emulator, lm)
    # the reference: the full model with the trained blocks copied by hand
    reference = copy.deepcopy(full)
    for i in lm.adapter_layers():
        decoder_layers(reference)[i].load_state_dict(decoder_layers(emulator)[i].state_dict())
    torch.testing.assert_close(logits(plugged, batch), logits(reference, batch), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(plugged, batch), logits(emulator, batch), atol=ATOL, rtol=0)
    assert not torch.allclose(logits(plugged, batch), logits(full, batch), atol=ATOL)


def test_plug_in_with_dropped_middle_keeps_full_middle(tiny8, map8, batch):
    full = tiny8[0]
    emulator = build_emulator(full, map8)
    train_step(emulator, batch)
    plugged = plug_in(full, emulator, map8)
    index = map8.emulator_index()
    for i in range(8):
        source = decoder_layers(emulator)[index[i]] if i in map8.adapter_layers() else decoder_layers(full)[i]
        for a, b in zip(decoder_layers(plugged)[i].state_dict().values(), source.state_dict().values()):
            assert torch.equal(a, b)
    assert len(decoder_layers(plugged)) == 8


def test_adapter_state_is_keyed_by_original_index(tiny8, map8):
    emulator = build_emulator(tiny8[0], map8)
    state = adapter_state(emulator, map8)
    assert "model.layers.7.mlp.down_proj.weight" in state
    assert {int(k.split(".")[2]) for k in state} == {0, 1, 6, 7}
    full_state = adapter_state(tiny8[0], map8)
    assert list(state) == list(full_state)
    assert all(np.array_equal(state[k], full_state[k]) for k in state)
    rng = np.random.default_rng(0)
    noisy = {k: (v + rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}
    load_adapter_state(emulator, noisy, map8)
    back = adapter_state(emulator, map8)
    assert all(np.array_equal(back[k], noisy[k]) for k in noisy)
    assert torch.equal(decoder_layers(emulator)[5].mlp.down_proj.weight, torch.from_numpy(noisy["model.layers.7.mlp.down_proj.weight"]))


def test_load_adapter_state_rejects_mismatches(tiny8, map8):
    emulator = build_emulator(tiny8[0], map8)
    state = adapter_state(emulator, map8)
    with pytest.raises(ValueError, match="missing 'model.layers.0"):
        load_adapter_state(emulator, {k: v for k, v in state.items() if not k.startswith("model.layers.0.")}, map8)
    with pytest.raises(ValueError, match="unknown 'model.layers.3"):
        load_adapter_state(emulator, {**state, "model.layers.3.mlp.up_proj.weight": state["model.layers.1.mlp.up_proj.weight"]}, map8)
    key = "model.layers.6.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match="has shape"):
        load_adapter_state(emulator, {**state, key: state[key][:3]}, map8)


def test_plug_in_merges_lora_on_adapter_blocks(tiny8, batch):
    full = tiny8[0]
    lm = make_layer_map(8, 2, 1)
    peft_emulator = attach_adapter_lora(build_emulator(full, lm), lm, LoraSettings(rank=4))
    with torch.no_grad():
        for name, p in peft_emulator.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lora_layers = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in peft_emulator.named_modules() if n.endswith("lora_A")}
    assert lora_layers == {0, 1, 6, 7}
    plugged = plug_in(full, peft_emulator, lm)
    torch.testing.assert_close(logits(plugged, batch), logits(peft_emulator, batch), atol=ATOL, rtol=0)
    everywhere = attach_lora(build_emulator(full, lm), LoraSettings(rank=4))
    with pytest.raises(ValueError, match="outside the adapter blocks"):
        plug_in(full, everywhere, lm)


def test_adapter_state_of_a_full_model_with_lora(tiny8, map8, batch):
    from peft import get_peft_model

    full = tiny8[0]
    config = LoraSettings(rank=4).to_peft()
    config.layers_to_transform, config.layers_pattern = [0, 1, 6, 7], "layers"
    peft_full = get_peft_model(copy.deepcopy(full), config)
    with torch.no_grad():
        for name, p in peft_full.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    state = adapter_state(peft_full, map8)
    merged = copy.deepcopy(peft_full).merge_and_unload()
    assert np.array_equal(state["model.layers.7.self_attn.q_proj.weight"], decoder_layers(merged)[7].self_attn.q_proj.weight.detach().numpy())
    emulator = build_emulator(full, map8)
    load_adapter_state(emulator, state, map8)  # the coordinator's merged adapters, sent to a client
    assert torch.equal(decoder_layers(emulator)[4].self_attn.q_proj.weight, decoder_layers(merged)[6].self_attn.q_proj.weight)
    config.layers_to_transform = [0, 3]
    with pytest.raises(ValueError, match="outside the adapter blocks"):
        adapter_state(get_peft_model(copy.deepcopy(full), config), map8)


def test_build_rejects_wrong_layer_map_and_peft(tiny8):
    with pytest.raises(ValueError, match="layer map is for 6 blocks, model has 8"):
        build_emulator(tiny8[0], make_layer_map(6, 1, 2))
    with pytest.raises(ValueError, match="PeftModel"):
        build_emulator(attach_lora(tiny8[0], LoraSettings()), make_layer_map(8, 1, 2))


def test_share_with_nothing_dropped_equals_the_backbone(tiny8, batch):
    lm = make_layer_map(8, 2, 1, fill="share")
    emulator = build_emulator(tiny8[0], lm)
    torch.testing.assert_close(logits(emulator, batch), logits(tiny8[0], batch), atol=ATOL, rtol=0)


def test_share_runs_the_backbone_with_dropped_blocks_replaced_by_their_source(tiny8, batch):
    full = tiny8[0]
    lm = make_layer_map(8, 2, 2, fill="share")
    emulator = build_emulator(full, lm)
    layers = decoder_layers(emulator)
    assert len(layers) == 8 and emulator.config.num_hidden_layers == 8
    assert len({id(layer) for layer in layers}) == 8  # distinct module objects per slot
    assert len({id(m) for layer in layers for m in layer.modules()}) == 8 * len(list(layers[0].modules()))
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(8))
    for slot, source in enumerate(lm.slots):  # a filled slot runs its source's very tensors
        assert layers[slot].mlp.up_proj.weight is layers[source].mlp.up_proj.weight
    assert layers[3].mlp.up_proj.weight is not layers[4].mlp.up_proj.weight
    reference = copy.deepcopy(full)  # the backbone with blocks 3 and 5 overwritten by 2 and 4
    for slot, source in enumerate(lm.slots):
        decoder_layers(reference)[slot].load_state_dict(decoder_layers(full)[source].state_dict())
    torch.testing.assert_close(logits(emulator, batch), logits(reference, batch), atol=ATOL, rtol=0)
    assert not torch.allclose(logits(emulator, batch), logits(full, batch), atol=1e-3)
    trainable = {int(n.split(".")[2]) for n, p in emulator.named_parameters() if p.requires_grad}
    assert trainable == {0, 1, 6, 7}  # adapter blocks sit at their original positions


def test_share_generates_with_the_kv_cache(tiny8):
    model, tokenizer = tiny8
    emulator = build_emulator(model, make_layer_map(8, 2, 2, fill="share"))
    ids = tokenizer(["hello there"], return_tensors="pt")
    cached = emulator.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = emulator.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_one_module_in_two_slots_would_break_the_cache(tiny8):
    """Why slots get distinct modules: one module (one layer_idx) in two slots corrupts generate()."""
    model, tokenizer = tiny8
    lm = make_layer_map(8, 2, 2, fill="share")
    emulator = build_emulator(model, lm)
    ids = tokenizer(["hello there"], return_tensors="pt")
    reference = emulator.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=False)
    layers = decoder_layers(emulator)
    emulator.model.layers = torch.nn.ModuleList([layers[source] for source in lm.slots])  # reused modules
    assert torch.equal(emulator.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=False), reference)
    assert not torch.equal(emulator.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=True), reference)


def test_share_trains_and_plugs_in(tiny8, batch):
    full = tiny8[0]
    lm = make_layer_map(8, 2, 2, fill="share")
    emulator = build_emulator(full, lm)
    train_step(emulator, batch)
    plugged = plug_in(full, emulator, lm)
    for i in range(8):
        source = decoder_layers(emulator)[i] if i in lm.adapter_layers() else decoder_layers(full)[i]
        for a, b in zip(decoder_layers(plugged)[i].state_dict().values(), source.state_dict().values()):
            assert torch.equal(a, b)
    peft = attach_adapter_lora(build_emulator(full, lm), lm, LoraSettings(rank=4))
    lora_layers = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in peft.named_modules() if n.endswith("lora_A")}
    assert lora_layers == {0, 1, 6, 7}
