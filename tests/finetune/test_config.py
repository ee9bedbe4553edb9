import re

import pytest

from finetune.config import ConfigError, FedsiteConfig, from_mapping, load_toml


def test_defaults_are_valid():
    assert FedsiteConfig().validate().model == "smollm2"


def test_kebab_and_snake_keys_and_coercion():
    config = from_mapping({"local-steps": "5", "lora_rank": 4, "lr": "0.01", "model": "tiny"})
    assert (config.local_steps, config.lora_rank, config.lr, config.model) == (5, 4, 0.01, "tiny")
    assert from_mapping(config.to_flat()) == config


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="unknown config field 'lora-rnak'"):
        from_mapping({"lora-rnak": 4})


def test_wrong_type_and_range_are_named():
    with pytest.raises(ConfigError, match="'local-steps'"):
        from_mapping({"local-steps": "many"})
    with pytest.raises(ConfigError, match="'partitioning'"):
        from_mapping({"partitioning": "random"})
    with pytest.raises(ConfigError, match="'fraction-train'"):
        from_mapping({"fraction-train": 0})


def test_toml_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('model = "tiny"\nclients = 6\nlocal-steps = 3\n')
    config = load_toml(path)
    assert (config.model, config.clients, config.local_steps) == ("tiny", 6, 3)
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")
    path.write_text("model = [")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_toml(path)


def test_rules_that_update_the_base_need_an_fp32_backbone_on_every_client():
    FedsiteConfig(aggregation="fedex-lora").validate()
    with pytest.raises(ConfigError, match="'quantize'.*updates the frozen base weights"):
        FedsiteConfig(aggregation="fedex-lora", quantize="nf4").validate()
    with pytest.raises(ConfigError, match="'emulator-share'"):
        FedsiteConfig(aggregation="flora", emulator_share=0.5).validate()


def test_offsite_clients_get_their_own_learning_rate():
    config = FedsiteConfig(lr=2e-3)
    assert config.client_lr() == 2e-3
    assert config.client_lr("lora") == 2e-3
    assert config.client_lr("blocks") == 1e-4  # whole blocks diverge at a LoRA learning rate
    tuned = FedsiteConfig(lr=2e-3, offsite_lr=3e-4)
    assert tuned.client_lr("blocks") == tuned.client_lr("lora") == 3e-4 and tuned.client_lr() == 2e-3
    with pytest.raises(ValueError, match="offsite-lr"):
        FedsiteConfig(offsite_lr=-1.0).validate()


def test_offsite_clients_get_their_own_proximal_term():
    assert FedsiteConfig().client_proximal_mu() == 0.0 and FedsiteConfig().client_proximal_mu("lora") == 0.0
    fedprox = FedsiteConfig(aggregation="fedprox", proximal_mu=0.01)
    assert fedprox.client_proximal_mu() == fedprox.client_proximal_mu("blocks") == 0.01
    tuned = FedsiteConfig(aggregation="fedprox", proximal_mu=0.01, offsite_proximal_mu=1.0)
    assert tuned.client_proximal_mu("lora") == 2.0 and tuned.client_proximal_mu() == 0.01  # mu/2 = lambda
    assert FedsiteConfig(offsite_proximal_mu=0.5).client_proximal_mu("blocks") == 1.0
    with pytest.raises(ValueError, match="offsite-proximal-mu"):
        FedsiteConfig(offsite_proximal_mu=-1.0).validate()


def test_offsite_lora_has_its_own_targets_and_the_runs_rank():
    config = FedsiteConfig(lora_rank=4, lora_targets="q_proj", offsite_lora_targets="up_proj, down_proj")
    assert config.lora_settings().targets == ("q_proj",)
    offsite = config.offsite_lora_settings()
    assert offsite.targets == ("up_proj", "down_proj") and offsite.rank == 4
    with pytest.raises(ValueError, match="offsite-lora-targets"):
        FedsiteConfig(offsite_lora_targets=" , ").validate()


def test_emulator_keep_is_a_share_or_off():
    assert FedsiteConfig().emulator_keep == 0.8 and from_mapping({"emulator-keep": 0.0}).emulator_keep == 0.0  # 0: every emulator-stride-th block
    for value in (-0.1, 1.2):
        with pytest.raises(ConfigError, match=r"'emulator-keep'.*in \[0, 1\]"):
            from_mapping({"emulator-keep": value})


def test_reply_bounds_fields_and_their_defaults():
    config = FedsiteConfig()
    assert (config.max_update_norm, config.max_update_norm_multiple, config.max_client_examples, config.max_weight_share) == (-1.0, 5.0, 100000, 0.0)
    assert from_mapping({"max-update-norm": 0, "max-weight-share": 0.5}).max_update_norm == 0.0  # 0 turns the norm bound off
    for key, value, words in [
        ("max-update-norm-multiple", 0.5, "at least 1"),
        ("max-client-examples", -1, "non-negative"),
        ("max-weight-share", 1.5, "in [0, 1]"),
        ("max-update-norm", float("nan"), "a finite number"),
        ("max-update-mb", -1.0, "non-negative"),
    ]:
        with pytest.raises(ConfigError, match=f"'{key}'.*{re.escape(words)}"):
            from_mapping({key: value})
