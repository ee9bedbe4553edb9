"""A federation mixing LoRA clients and offsite (emulator) clients, through Flower's simulation engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from finetune.config import FedsiteConfig
from simulations.runner import simulate


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("offsite") / "run"
    config = FedsiteConfig(
        model="tiny", clients=4, num_server_rounds=2, local_steps=3, lr=0.01, emulator_share=0.5,
        train_per_task=20, test_per_task=4, eval_examples=12, max_new_tokens=4, out=str(out),
    )
    simulate(config)
    return out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_both_kinds_train_and_each_is_aggregated_with_its_own(mixed_run):
    clients = read_jsonl(mixed_run / "clients.jsonl")
    kinds = {(c["round"], c["package_kind"]) for c in clients if c["status"] == "accepted"}
    assert kinds == {(1, "lora"), (1, "emulator"), (2, "lora"), (2, "emulator")}
    baseline, *rows = read_jsonl(mixed_run / "metrics.jsonl")
    assert baseline["round"] == 0 and "offsite_eval_loss" in baseline and "contributors_by_kind" not in baseline
    for row in rows:
        assert sorted(row["contributors_by_kind"]) == ["emulator", "lora"]
        assert len(row["contributors_by_kind"]["emulator"]) == 2 and len(row["contributors_by_kind"]["lora"]) == 2
        assert np.isfinite(row["offsite_eval_loss"]) and np.isfinite(row["eval_loss"])
    summary = json.loads((mixed_run / "summary.json").read_text())
    assert "emulator_eval_loss" in summary["initial"] and "emulator_eval_loss" in summary["final"]
    assert summary["offsite"]["emulator_bytes"] < summary["offsite"]["backbone_bytes"]


def test_plug_in_adapter_is_exported_for_the_full_backbone_and_trained(mixed_run):
    adapter = load_file(str(mixed_run / "offsite_adapter" / "adapter_model.safetensors"))
    config = json.loads((mixed_run / "offsite_adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [0, 3]  # tiny: 4 blocks, one adapter block at each end
    blocks = {int(k.split(".layers.")[1].split(".")[0]) for k in adapter}
    assert blocks == {0, 3}
    assert any(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    lora = load_file(str(mixed_run / "adapter" / "adapter_model.safetensors"))
    assert any(np.abs(v).max() > 0 for k, v in lora.items() if "lora_B" in k)


def test_shared_emulator_with_per_round_alignment_and_proximal_term(tmp_path_factory):
    """Depth-kept emulator, a signed refresh every round and the proximal term, through Flower."""
    out = tmp_path_factory.mktemp("aligned") / "run"
    config = FedsiteConfig(
        model="tiny", clients=2, num_server_rounds=2, local_steps=2, lr=0.01, emulator_share=1.0, emulator_fill="share",
        emulator_quantize="int8", emulator_align_steps=2, emulator_align_rank=2, offsite_proximal_mu=1.0,
        train_per_task=10, test_per_task=4, eval_examples=8, max_new_tokens=4, out=str(out),
    )
    simulate(config)
    clients = [c for c in read_jsonl(out / "clients.jsonl") if c.get("phase") != "query"]
    assert {(c["round"], c["status"]) for c in clients} == {(1, "accepted"), (2, "accepted")}  # refresh verified and applied
    baseline, *rows = read_jsonl(out / "metrics.jsonl")
    assert baseline["round"] == 0  # the initial evaluation; no refresh is sent before round 1
    assert [row["emulator_refresh_bytes"] > 0 for row in rows] == [True, True]
    held = [row["emulator_align_held"] for row in rows]  # the built-in set holds two batches out: what each alignment kept
    assert all(h["kept"] <= h["before"] and 0 <= h["kept_step"] <= 2 for h in held), held
    summary = json.loads((out / "summary.json").read_text())
    assert summary["offsite"]["layer_map"]["fill"] == "share"
