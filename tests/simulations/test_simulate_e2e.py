"""End to end through Flower's simulation engine on the tiny Llama: the Foundation contract.

`fedsite simulate --model tiny --clients 4 --rounds 2 --device cpu --out DIR` writes metrics.jsonl
(one object per round) and a PEFT adapter that stock `PeftModel.from_pretrained` loads.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from peft import PeftModel

from finetune.backbone import build_tiny_llama
from finetune.lora import LoraSettings, attach_lora, get_lora_arrays


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsite", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    proc = run_cli(
        "simulate", "--model", "tiny", "--clients", "4", "--rounds", "2", "--out", str(out),
        "--local-steps", "4", "--train-per-task", "20", "--test-per-task", "4", "--eval-examples", "12",
        "--max-new-tokens", "4", "--fraction-evaluate", "0.5", "--lr", "0.01", "--device", "cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_metrics_written_per_round(tiny_run):
    out, _ = tiny_run
    baseline, *rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert baseline["round"] == 0 and np.isfinite(baseline["eval_loss"]) and baseline["eval_seconds"] > 0
    assert not {"contributors", "train_loss", "profiles"} & set(baseline)  # evaluated before any training
    assert baseline == {"round": 0, **json.loads((out / "summary.json").read_text())["initial"]}
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert np.isfinite(row["eval_loss"]) and 0.0 <= row["eval_accuracy"] <= 1.0
        assert len(row["contributors"]) == 4 and row["rejected"] == []
        assert row["upload_bytes"] > 0 and np.isfinite(row["train_loss"])
        assert "federated_eval_accuracy" in row
    clients = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    assert len(clients) == 8 and all(c["status"] == "accepted" for c in clients)
    assert sorted({c["client_id"] for c in clients}) == [0, 1, 2, 3]
    for name in ("summary.md", "summary.json", "curves.png", "config.toml"):
        assert (out / name).stat().st_size > 0, name


def test_exported_adapter_loads_with_peft_and_changed(tiny_run):
    out, _ = tiny_run
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    loaded = get_lora_arrays(PeftModel.from_pretrained(build_tiny_llama(), adapter))
    initial = get_lora_arrays(attach_lora(build_tiny_llama(), LoraSettings(), seed=0))
    assert loaded.keys() == initial.keys()
    changed = [k for k in initial if not np.array_equal(initial[k], loaded[k])]
    assert any("lora_B" in k for k in changed)


def test_the_results_explain_themselves(tiny_run):
    """summary.md: train / eval / total seconds and the plumbing-check note; adapter/: a filled card, the
    base named as it can be resolved, the local path beside it, and Fedsite's own loader finds it."""
    from finetune.lora import load_adapter

    out, _ = tiny_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    for row in rows:
        assert 0 < row["train_seconds"] <= row["round_seconds"] < row["total_seconds"]
        assert row["federated_eval_seconds"] > 0  # --fraction-evaluate 0.5
        assert row["total_seconds"] == pytest.approx(row["round_seconds"] + row["eval_seconds"])
    summary = (out / "summary.md").read_text()
    assert "| train s | eval s | total s |" in summary and "Plumbing check" in summary and "0.000, as expected" in summary
    card = (out / "adapter" / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny\n") and "Plumbing check" in card and "| 0 (baseline) |" in card
    assert "| 2 |" in card and "rounds: 2 of 2 planned" in card and "clients: 4" in card and "no differential privacy" in card
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    assert json.loads((out / "adapter" / "fedsite_backbone.json").read_text())["local_path"] == "tiny"
    loaded, _ = load_adapter(out / "adapter")
    assert loaded.peft_config["default"].r == 8


def test_progress_is_shown(tiny_run):
    _, proc = tiny_run
    log = proc.stdout + proc.stderr
    assert "[fedsite] round 1/2" in log and "[fedsite] round 2/2" in log


def test_unknown_option_value_is_one_line_error(tmp_path):
    proc = run_cli("simulate", "--model", "tiny", "--partitioning", "random", "--out", str(tmp_path / "x"), timeout=120)
    assert proc.returncode != 0
    assert "partitioning" in proc.stderr.strip().splitlines()[-1]


def test_console_is_quiet_without_verbose_and_the_logs_are_in_the_results_folder(tiny_run):
    out, proc = tiny_run
    lines = [line for line in (proc.stdout + proc.stderr).split("\n") if line.strip()]
    assert len(lines) < 15, "\n".join(lines)
    assert not [line for line in lines if "DEBUG" in line or "WARNING" in line or "Warning" in line], "\n".join(lines)
    assert len(set(lines)) == len(lines), "a line is printed twice"
    assert not [line for line in lines if "lora-rank" in line or "ConfigRecord" in line], "the config is dumped"
    assert sum("config.toml" in line for line in lines) == 1 and (out / "config.toml").is_file()
    assert sum("plumbing check" in line for line in lines) == 1
    driver_log = (out / "logs" / "fedsite.log").read_text()
    assert driver_log.count("Starting FedsiteStrategy strategy") == 1  # Flower's lines: in the file, once
    assert "DEPRECATED FEATURE" in driver_log
    workers = list((out / "logs").glob("worker-*.log"))
    assert workers and any("round 1:" in path.read_text() for path in workers)  # the ClientApp's own lines
