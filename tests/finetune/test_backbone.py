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
