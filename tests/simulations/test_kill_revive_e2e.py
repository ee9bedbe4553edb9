"""The Kill-and-Revive contract, end to end through Flower's simulation engine on the tiny Llama:
`fedsite simulate --model tiny --clients 4 --rounds 2 --module-selection kill-revive --out DIR`
works, DIR/metrics.jsonl rows carry the active modules, and modules never active are exported
exactly as they started."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from finetune.cache import initial_lora_arrays
from finetune.config import FedsiteConfig
from protos.selection import keys_of, modules_of


def test_kill_revive_simulation_records_the_selection_and_leaves_killed_modules_alone(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsite", "simulate", "--model", "tiny", "--clients", "4", "--rounds", "2", "--module-selection", "kill-revive",
         "--kr-active-share", "0.25", "--out", str(out), "--local-steps", "3", "--train-per-task", "12", "--test-per-task", "2",
         "--eval-examples", "6", "--max-new-tokens", "2", "--lr", "0.01", "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    baseline, *rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert baseline["round"] == 0 and "active_modules" not in baseline  # the initial evaluation trains nothing
    assert [r["round"] for r in rows] == [1, 2]
    initial = initial_lora_arrays("tiny", FedsiteConfig().lora_settings(), 0)
    modules = modules_of(initial)
    for row in rows:
        assert len(row["active_modules"]) == 2 and set(row["active_modules"]) <= set(modules) and row["active_share"] == 0.25
        assert len(row["contributors"]) == 4 and row["rejected"] == []
    assert rows[0]["active_modules"] != rows[1]["active_modules"]  # unscored modules are tried first
    full_bytes = sum(v.nbytes for v in initial.values())
    clients = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines() if '"phase"' not in line]
    assert clients and all(c["status"] == "accepted" and c["upload_bytes"] < 0.3 * full_bytes for c in clients)
    exported = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items()}
    never = [m for m in modules if all(m not in r["active_modules"] for r in rows)]
    assert len(never) == 4
    for key in keys_of(initial, never):
        assert np.array_equal(exported[key], initial[key]), key
    trained = keys_of(initial, rows[0]["active_modules"])
    assert any(not np.array_equal(exported[k], initial[k]) for k in trained)


def test_the_kill_revive_experiment_file_and_its_sweep_plan_valid_runs(tmp_path):
    from simulations.experiment import load_experiment
    from simulations.sweep import plan_sweep

    experiment = load_experiment(Path(__file__).parents[2] / "simulations" / "experiments" / "kill_revive.toml")
    assert experiment.config.module_selection == "kill-revive" and experiment.config.partitioning == "dirichlet"
    runs = plan_sweep(experiment, tmp_path)
    assert [r.config.kr_active_share for r in runs] == [0.25, 0.5, 1.0]
    assert all(r.config.module_selection == "kill-revive" and r.config.clients == 20 for r in runs)
