"""The coordinator's offsite track: package built and signed, plug-in fed by client arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.offsite import OffsiteSpec, offsite_model
from coordinator.offsite import OffsiteTrack, is_emulator_client, join_tracks, prepare_offsite, split_tracks
from emulator.keys import PackageError
from emulator.offsite import get_offsite_arrays, set_offsite_arrays
from finetune.config import FedsiteConfig


@pytest.fixture(scope="module")
def track(tmp_path_factory) -> tuple[FedsiteConfig, OffsiteTrack]:
    config = FedsiteConfig(model="tiny", out=str(tmp_path_factory.mktemp("run")), emulator_share=0.5, lora_rank=4)
    return config, prepare_offsite(config)


def test_package_is_built_signed_and_smaller(track):
    config, t = track
    assert (t.package / "manifest.sig").is_file() and t.layer_map.dropped() == (2,)  # tiny: 4 blocks, k=1, stride 2
    assert t.summary["emulator_bytes"] < t.summary["backbone_bytes"]
    assert set(t.client_config()) == {"package-kind", "emulator-package", "emulator-public-key", "offsite-train"}
    blocks = {int(k.split(".layers.")[1].split(".")[0]) for k in t.initial}
    assert blocks == {0, 3}


def test_client_trains_what_the_plug_in_loads(track):
    config, t = track
    spec = OffsiteSpec.from_config(t.client_config())
    emulator, tokenizer, layer_map = offsite_model(spec, config.lora_settings(), config.seed)
    set_offsite_arrays(emulator, t.initial, layer_map, spec.mode)
    with torch.no_grad():  # stands in for local training: move every LoRA factor
        for name, p in emulator.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
    trained = get_offsite_arrays(emulator, layer_map, spec.mode)
    plug_in = t.load(trained)
    assert all(np.array_equal(get_offsite_arrays(plug_in, t.layer_map, t.mode)[k], v) for k, v in trained.items())
    assert not all(np.array_equal(trained[k], t.initial[k]) for k in trained)


def test_pinned_key_and_missing_fields_are_refused(track):
    _, t = track
    with pytest.raises(PackageError, match="pinned"):
        OffsiteSpec.from_config(t.client_config(), pinned_key_pem="-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----")
    values = t.client_config()
    del values["emulator-package"]
    with pytest.raises(PackageError, match="emulator-package"):
        OffsiteSpec.from_config(values)


def test_tracks_split_and_join_without_loss():
    lora = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 3), np.float32)}
    offsite = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 3), np.float32)}
    joint = join_tracks(lora, offsite)
    assert len(joint) == 2
    back_lora, back_offsite = split_tracks(joint)
    assert (back_lora[next(iter(lora))] == 1).all() and (back_offsite[next(iter(offsite))] == 0).all()


@pytest.mark.parametrize("share,clients,expected", [(0.0, 10, 0), (0.5, 10, 5), (0.25, 8, 2), (1.0, 3, 3)])
def test_emulator_share_spreads_over_clients(share, clients, expected):
    assert sum(is_emulator_client(pid, share) for pid in range(clients)) == expected
