"""Offsite arrays: keyed by original block, loadable into the emulator and the full backbone alike."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from emulator.build import build_emulator, plug_in
from emulator.offsite import get_offsite_arrays, renumber, set_offsite_arrays, trainable_model
from finetune.lora import LoraSettings
from tests.emulator.conftest import logits

SETTINGS = LoraSettings(rank=4, alpha=8)


def perturb(arrays: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in arrays.items()}


@pytest.mark.parametrize("mode", ["lora", "lora-top", "blocks"])
def test_keys_use_original_block_indices(tiny8, map8, mode):
    emulator = trainable_model(build_emulator(tiny8[0], map8), map8, mode, SETTINGS)
    blocks = {int(k.split(".layers.")[1].split(".")[0]) for k in get_offsite_arrays(emulator, map8, mode)}
    # (0, 1, 6, 7); emulator positions would be 4, 5 for the top; lora-top trains the top ones only
    assert blocks == set(map8.top if mode == "lora-top" else map8.adapter_layers())
    trainable = {int(n.split(".layers.")[1].split(".")[0]) for n, p in emulator.named_parameters() if p.requires_grad}
    assert trainable == ({4, 5} if mode == "lora-top" else {0, 1, 4, 5})  # emulator positions


@pytest.mark.parametrize("mode", ["lora", "lora-top", "blocks"])
def test_emulator_arrays_load_into_the_full_model_as_the_plug_in(tiny8, map8, batch, mode):
    full, _ = tiny8
    emulator = trainable_model(build_emulator(full, map8), map8, mode, SETTINGS)
    trained = perturb(get_offsite_arrays(emulator, map8, mode))  # stands in for local training
    set_offsite_arrays(emulator, trained, map8, mode)

    target = trainable_model(copy.deepcopy(full), map8, mode, SETTINGS, seed=7)  # other LoRA init: overwritten
    set_offsite_arrays(target, trained, map8, mode)
    reference = plug_in(full, emulator, map8)  # merges LoRA, copies blocks into a full copy
    torch.testing.assert_close(logits(target, batch), logits(reference, batch), atol=1e-5, rtol=1e-5)
    assert all(np.array_equal(get_offsite_arrays(target, map8, mode)[k], v) for k, v in trained.items())


def test_only_adapter_parameters_train(tiny8, map8):
    emulator = trainable_model(build_emulator(tiny8[0], map8), map8, "lora", SETTINGS)
    names = [n for n, p in emulator.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    blocks = trainable_model(build_emulator(tiny8[0], map8), map8, "blocks", SETTINGS)
    positions = {int(n.split(".layers.")[1].split(".")[0]) for n, p in blocks.named_parameters() if p.requires_grad}
    assert positions == {0, 1, 4, 5}  # emulator positions of original blocks 0, 1, 6, 7


def test_errors_are_one_line(tiny8, map8):
    with pytest.raises(ValueError, match="train mode"):
        trainable_model(tiny8[0], map8, "full", SETTINGS)
    with pytest.raises(ValueError, match="not in an adapter block"):
        renumber({"model.layers.3.mlp.weight": np.zeros(1)}, {0: 0})
    emulator = trainable_model(build_emulator(tiny8[0], map8), map8, "lora", SETTINGS)
    arrays = get_offsite_arrays(emulator, map8, "lora")
    arrays.pop(next(iter(arrays)))
    with pytest.raises(ValueError, match="missing"):
        set_offsite_arrays(emulator, arrays, map8, "lora")
