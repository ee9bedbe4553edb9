import pytest
import torch

from finetune.backbone import BackboneError, build_tiny_llama, load_backbone, save_plain_folder


def test_tiny_is_deterministic_and_runs(tiny):
    model, tokenizer = tiny
    again = build_tiny_llama()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ids = tokenizer("Sort: 3 1 2", return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))
    assert tokenizer.decode(ids["input_ids"][0]) == "Sort: 3 1 2"
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None


def test_tiny_seed_changes_weights():
    a, b = build_tiny_llama(seed=0), build_tiny_llama(seed=1)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_local_folder_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    save_plain_folder(model, tokenizer, tmp_path / "m")
    loaded, loaded_tok = load_backbone(str(tmp_path / "m"))
    ids = tokenizer("hello", return_tensors="pt")
    assert torch.allclose(model(**ids).logits, loaded(**ids).logits, atol=1e-6)
    assert loaded_tok.decode(loaded_tok("abc")["input_ids"]) == "abc"


def test_missing_path_is_one_line_error(tmp_path):
    with pytest.raises(BackboneError, match="does not exist") as err:
        load_backbone(str(tmp_path / "nope"))
    assert "\n" not in str(err.value)


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(BackboneError, match="no config.json"):
        load_backbone(str(tmp_path))


def test_unsupported_model_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "not-a-model"}')
    with pytest.raises(BackboneError, match="cannot load") as err:
        load_backbone(str(tmp_path))
    assert "\n" not in str(err.value)


def test_portable_ids_name_what_a_receiver_can_resolve(tmp_path, monkeypatch):
    import json

    from finetune.backbone import SMOLLM2_ID, portable_model_id

    monkeypatch.setenv("FEDSITE_CACHE", str(tmp_path / "cache"))
    assert portable_model_id("smollm2") == SMOLLM2_ID  # the embedded GGUF is this hub model; nothing is converted to say so
    assert not (tmp_path / "cache").exists()
    assert portable_model_id("tiny") == "tiny"
    named, unnamed, odd = tmp_path / "named", tmp_path / "unnamed", tmp_path / "odd"
    for folder, config in ((named, {"_name_or_path": "org/some-model"}), (unnamed, {}), (odd, {"_name_or_path": "/abs/path/x"})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    assert portable_model_id(str(named)) == "org/some-model"
    assert portable_model_id(str(unnamed)) == str(unnamed.resolve()) and portable_model_id(str(odd)) == str(odd.resolve())


def test_an_exported_adapter_reloads_on_its_local_backbone(tiny, tmp_path):
    import json

    import numpy as np

    from finetune.backbone import backbone_for_adapter
    from finetune.lora import LoraSettings, attach_lora, export_adapter, get_lora_arrays, load_adapter, set_lora_arrays

    model, tokenizer = tiny
    save_plain_folder(model, tokenizer, tmp_path / "m")  # a local model folder, as `--model PATH` names one
    peft = attach_lora(load_backbone(str(tmp_path / "m"))[0], LoraSettings(rank=2))
    arrays = {k: np.full(v.shape, 0.5, np.float32) for k, v in get_lora_arrays(peft).items()}
    set_lora_arrays(peft, arrays)
    folder = export_adapter(peft, tmp_path / "adapter", str(tmp_path / "m"))
    assert backbone_for_adapter(folder) == str((tmp_path / "m").resolve())
    loaded, _ = load_adapter(folder)
    assert all(np.array_equal(v, arrays[k]) for k, v in get_lora_arrays(loaded).items())
    note = json.loads((folder / "fedsite_backbone.json").read_text())
    (folder / "fedsite_backbone.json").write_text(json.dumps({**note, "local_path": str(tmp_path / "gone"), "model": str(tmp_path / "gone")}))
    with pytest.raises(BackboneError, match="not on this machine") as err:
        backbone_for_adapter(folder)
    assert "\n" not in str(err.value)
    (folder / "fedsite_backbone.json").write_text("[1, 2")
    with pytest.raises(BackboneError, match="cannot read"):
        backbone_for_adapter(folder)
