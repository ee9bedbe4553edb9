"""coordinator/model_card.py: adapter/README.md says what the adapter is, from the run's own records."""

import json

import pytest

from coordinator.model_card import model_card, spent_epsilon, write_model_card
from coordinator.results import TINY_NOTE, RunRecorder
from finetune.backbone import SMOLLM2_ID, backbone_note, cache_dir
from finetune.config import FedsiteConfig
from finetune.lora import LoraSettings, attach_lora, export_adapter

INITIAL = {"eval_loss": 2.2, "eval_accuracy": 0.0, "eval_seconds": 30.0}
ROUNDS = [
    {"round": r, "eval_loss": 2.0 / r, "eval_accuracy": 0.1 * r, "train_loss": 1.5 / r, "contributors": [0, 1, 2], "rejected": [],
     "upload_bytes": 300_000, "train_seconds": 20.0, "eval_seconds": 30.0, "total_seconds": 50.0, "offsite_eval_accuracy": 0.05 * r}
    for r in (1, 2, 3)
]


@pytest.fixture()
def smollm2_cache(tmp_path, monkeypatch):
    """A converted-SmolLM2 folder as finetune/backbone.py leaves it (no weights needed to name it)."""
    monkeypatch.setenv("FEDSITE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_the_card_names_the_portable_base_the_local_copy_method_privacy_and_results(smollm2_cache):
    config = FedsiteConfig(model="smollm2", clients=5, num_server_rounds=3, aggregation="fedadam", server_lr=0.02, lora_rank=4,
                           lora_targets="q_proj,k_proj", quantize="nf4", dp="local", noise_multiplier=1.1, delta=1e-6)
    ledger = [{"round": 1, "client": 0, "epsilon": 0.8}, {"round": 3, "client": 0, "epsilon": 2.5}, {"round": 3, "client": 1, "epsilon": 1.2}]
    card = model_card(config, backbone_note("smollm2"), INITIAL, ROUNDS, ledger)
    assert card.startswith(f"---\nbase_model: {SMOLLM2_ID}\nlibrary_name: peft\n")
    assert f"local copy this run used: `{smollm2_cache}`" in card and "--model smollm2" in card
    assert "built-in suite of generated instruction tasks" in card and "arithmetic" in card and "partitioned iid" in card
    assert "aggregation: fedadam (server lr 0.02)" in card and "rank 4" in card and "`q_proj,k_proj`" in card and "nf4" in card
    assert "offsite: off" in card
    assert "rounds: 3 of 3 planned" in card and "clients: 5" in card and "contributors per round: 3, 3, 3" in card
    assert "local DP-SGD" in card and "noise multiplier 1.1" in card and "epsilon 2.500 at delta 1e-06" in card
    assert "| 0 (baseline) | 0.000 | 2.200 |" in card and "| 3 | 0.300 | 0.667 | 0.500 | 3 | 0 | 0.30 | 20.0 | 30.0 | 50.0 |" in card
    assert f'AutoModelForCausalLM.from_pretrained("{SMOLLM2_ID}")' in card and 'load_adapter("adapter")' in card
    assert TINY_NOTE not in card and "differential-privacy" in card


def test_user_level_dp_and_no_dp_are_stated():
    ledger = [{"round": 1, "mechanism": "client-dp", "epsilon": 4.0}, {"round": 2, "mechanism": "client-dp", "epsilon": 6.5}]
    note = {"base_model_name_or_path": "tiny", "model": "tiny", "local_path": "tiny"}
    card = model_card(FedsiteConfig(model="tiny", dp="client", noise_multiplier=0.8, dp_clip_norm=0.05), note, INITIAL, ROUNDS, ledger)
    assert "user-level DP at the coordinator" in card and "epsilon 6.500 at delta 1e-05" in card
    plain = model_card(FedsiteConfig(model="tiny"), note, INITIAL, ROUNDS, [])
    assert "no differential privacy" in plain and "epsilon" not in plain.split("## Privacy")[1].split("## Results")[0]
    assert TINY_NOTE in plain and "build_tiny_llama()" in plain and "from_pretrained(\"tiny\")" not in plain
    assert spent_epsilon([{"epsilon": float("nan")}, {"epsilon": "3"}]) is None  # a ledger line is data, never trusted


def test_the_offsite_card_shows_the_plug_ins_scores():
    config = FedsiteConfig(model="tiny", emulator_share=0.5)
    note = {"base_model_name_or_path": "tiny", "model": "tiny", "local_path": "tiny"}
    card = model_card(config, note, {**INITIAL, "offsite_eval_accuracy": 0.0, "offsite_eval_loss": 2.5}, ROUNDS, [], offsite=True)
    assert "Offsite plug-in adapter" in card and "0.5 of the clients train against an emulator" in card
    assert "| 2 | 0.100 |" in card and "| 0 (baseline) | 0.000 | 2.500 |" in card and 'load_adapter("offsite_adapter")' in card


def test_export_then_card_replaces_pefts_template_and_keeps_the_portable_id(tiny, tmp_path, smollm2_cache):
    """The default model's contract: adapter_config.json names HuggingFaceTB/SmolLM2-135M-Instruct
    (the mapping is checked here on the tiny Llama's LoRA; no SmolLM2 weights are loaded)."""
    config = FedsiteConfig(model="smollm2", out=str(tmp_path / "run"), num_server_rounds=1)
    recorder = RunRecorder(config.out, config)
    recorder.finish_round(0, dict(INITIAL))
    recorder.record(**{k: v for k, v in ROUNDS[0].items() if k not in ("round", "eval_loss", "eval_accuracy")})
    recorder.finish_round(1, {"eval_loss": 1.0, "eval_accuracy": 0.2})
    folder = export_adapter(attach_lora(tiny[0], LoraSettings(rank=2)), tmp_path / "run" / "adapter", "smollm2")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2_ID
    assert json.loads((folder / "fedsite_backbone.json").read_text()) == {
        "base_model_name_or_path": SMOLLM2_ID, "model": "smollm2", "local_path": str(smollm2_cache)}
    write_model_card(folder, config, recorder.initial, recorder.rounds)
    card = (folder / "README.md").read_text()
    assert f"base_model: {SMOLLM2_ID}" in card and "| 1 | 0.200 | 1.000 |" in card
    assert "[More Information Needed]" not in card  # PEFT's empty template is gone


@pytest.mark.skipif(not (cache_dir() / "smollm2-135m-instruct" / "model.safetensors").is_file(),
                    reason="the default model is not converted into the cache yet (first `fedsite simulate` does it)")
def test_the_default_models_adapter_names_smollm2_and_reloads_on_the_cached_backbone(tmp_path):
    """The contract on the real default backbone, when its conversion is already cached (no conversion here)."""
    from finetune.backbone import load_backbone
    from finetune.lora import load_adapter

    folder = export_adapter(attach_lora(load_backbone("smollm2")[0], LoraSettings(rank=2)), tmp_path / "adapter", "smollm2")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2_ID
    loaded, _ = load_adapter(folder)
    assert loaded.peft_config["default"].r == 2
