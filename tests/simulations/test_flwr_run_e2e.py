"""`flwr run .` (Flower's own front door) on the tiny Llama through a managed local SuperLink.

The SuperLink that `flwr run` starts keeps running after the run; this test gives it a private
FLWR_HOME and stops it afterwards, so nothing is left behind.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def stop_processes(marker: str) -> None:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    for pid in found:
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    while time.time() < deadline and subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0:
        time.sleep(0.5)
    subprocess.run(["pkill", "-9", "-f", marker])


@pytest.fixture()
def flwr_home(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    yield home
    stop_processes(str(home))  # the managed SuperLink's command line names its log file in FLWR_HOME


EXPERIMENT = """
[population]
clients = 3

[[profiles]]
name = "big"
share = 0.5

[[profiles]]
name = "small"
share = 0.5
lora-rank = 4
"""


def test_flwr_run_dot_simulates_a_population_and_writes_results(flwr_home, tmp_path):
    """Flower's own front door with an experiment file: the ServerApp plans per-client packages
    (HetLoRA ranks by profile) for the SuperLink's simulated SuperNodes."""
    out = tmp_path / "run"
    experiment = tmp_path / "experiment.toml"
    experiment.write_text(EXPERIMENT)
    overrides = (
        f"model='tiny' num-server-rounds=2 local-steps=3 train-per-task=20 test-per-task=4 eval-examples=12 max-new-tokens=4 "
        f"clients=3 aggregation='hetlora' experiment='{experiment}' out='{out}'"
    )
    env = {**os.environ, "FLWR_HOME": str(flwr_home)}
    # flwr migrates (rewrites) the pyproject.toml it runs from: run a copy of the app
    app = tmp_path / "app"
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(".venv", ".git", "results", "__pycache__", "*.egg-info", ".pytest_cache"))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "run", ".", "--run-config", overrides, "--federation-config", "num-supernodes=3", "--stream"],
        cwd=app, env=env, capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    baseline, *rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert baseline["round"] == 0 and "profiles" not in baseline  # the round-0 evaluation: no training keys
    assert [r["round"] for r in rows] == [1, 2]
    assert len(rows[-1]["contributors"]) == 3
    assert all(sum(r["profiles"].values()) == 3 for r in rows)
    clients = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    assert len(clients) == 6 and all(c["status"] == "accepted" for c in clients)
    assert all(c["lora_rank"] == (4 if c["profile"] == "small" else 8) for c in clients)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
