"""Privacy and quantization switched on per run, through Flower's simulation on the tiny Llama."""

import json

import pytest

from finetune.config import FedsiteConfig
from finetune.privacy import epsilon_for
from simulations.runner import simulate


def small(tmp_path, **changes) -> FedsiteConfig:
    base = dict(model="tiny", clients=3, num_server_rounds=2, local_steps=2, batch_size=4, train_per_task=6, test_per_task=1, eval_examples=6, max_new_tokens=2, workers=1, out=str(tmp_path / "run"))
    return FedsiteConfig(**{**base, **changes})


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_local_dp_ledger_recomputes_and_exhausted_clients_decline(tmp_path):
    out = simulate(small(tmp_path, dp="local", noise_multiplier=1.0, epsilon_budget=3.0))
    ledger = lines(out / "privacy.jsonl")
    assert ledger and all(e["mechanism"] == "local-dp-sgd" for e in ledger)
    for entry in ledger:  # the ledger alone is enough to recompute epsilon with a fresh accountant
        history = [(entry["noise_multiplier"], entry["sample_rate"], entry["total_steps"])]
        assert entry["epsilon"] == pytest.approx(epsilon_for(history, entry["delta"]), rel=1e-6)
    assert min(e["epsilon"] for e in ledger if e["round"] == 1) >= 3.0  # round 1 spends the whole budget...
    rounds = lines(out / "metrics.jsonl")[1:]  # after the round-0 baseline
    assert rounds[1]["contributors"] == [] and all("declined" in r["reason"] for r in rounds[1]["rejected"])  # ...so round 2 is declined


def test_client_level_dp_writes_a_global_ledger(tmp_path):
    out = simulate(small(tmp_path, dp="client", noise_multiplier=0.8, dp_clip_norm=0.05))
    ledger = lines(out / "privacy.jsonl")
    assert {e["mechanism"] for e in ledger} == {"client-dp"}
    by_round = {e["round"]: e["epsilon"] for e in ledger}
    assert 0 < by_round[1] < by_round[2]


def test_qlora_clients_train_on_a_4bit_backbone(tmp_path):
    out = simulate(small(tmp_path, quantize="nf4", upload_codec="int8"))
    rows = lines(out / "metrics.jsonl")
    assert rows[0]["round"] == 0 and all(len(r["contributors"]) == 3 for r in rows[1:])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
