"""Every aggregation rule the federation supports, through Flower's simulation on the tiny Llama."""

import json

import numpy as np
import pytest
from peft import PeftModel

from finetune.backbone import build_tiny_llama
from finetune.config import FedsiteConfig
from finetune.lora import LoraSettings, attach_lora, get_lora_arrays
from simulations.runner import simulate

RULES = ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "ffa-lora", "rolora", "hetlora", "median", "trimmed-mean"]


def run_rule(rule: str, tmp_path) -> tuple[FedsiteConfig, object, list[dict]]:
    """Three clients, two rounds of `rule` on the tiny Llama: every client contributes every round."""
    config = FedsiteConfig(
        model="tiny", clients=3, num_server_rounds=2, local_steps=2, batch_size=4, train_per_task=6, test_per_task=1,
        eval_examples=6, max_new_tokens=2, aggregation=rule, lr=0.01, out=str(tmp_path / rule), workers=1,
    )
    out = simulate(config)
    baseline, *rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert baseline["round"] == 0 and "aggregation" not in baseline
    assert [r["aggregation"] for r in rows] == [rule, rule]
    assert all(len(r["contributors"]) == 3 and not r["rejected"] for r in rows)
    return config, out, rows


@pytest.mark.parametrize("rule", RULES)
def test_rule_runs_in_simulation(rule, tmp_path):
    _, out, _ = run_rule(rule, tmp_path)
    final = get_lora_arrays(PeftModel.from_pretrained(build_tiny_llama(), out / "adapter"))
    initial = get_lora_arrays(attach_lora(build_tiny_llama(), LoraSettings(), seed=0))
    a_keys = [k for k in initial if "lora_A" in k]
    b_keys = [k for k in initial if "lora_B" in k]
    assert any(not np.array_equal(final[k], initial[k]) for k in b_keys)
    if rule == "ffa-lora":
        assert all(np.array_equal(final[k], initial[k]) for k in a_keys)
    else:
        assert any(not np.array_equal(final[k], initial[k]) for k in a_keys)


@pytest.mark.parametrize("rule", ["fedex-lora", "flora"])
def test_rules_that_update_the_base_weights_run_and_export_what_was_scored(rule, tmp_path):
    """FedEx-LoRA / FLoRA in the federation: clients receive and apply the dense base update,
    and the exported adapter (stock PEFT, higher rank) scores exactly what the coordinator scored."""
    from finetune.backbone import build_char_tokenizer
    from finetune.evaluate import evaluate
    from finetune.sources import central_eval_set

    config, out, rows = run_rule(rule, tmp_path)
    loaded = PeftModel.from_pretrained(build_tiny_llama(), out / "adapter")
    assert loaded.peft_config["default"].r > config.lora_rank  # the base update does not fit in rank 8
    tokenizer = build_char_tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    result = evaluate(loaded, tokenizer, central_eval_set(config), config.max_seq_len, config.max_new_tokens)
    assert result.loss == pytest.approx(rows[-1]["eval_loss"], abs=1e-4)
    assert result.loss != pytest.approx(rows[0]["eval_loss"], abs=1e-6)  # training moved the model
