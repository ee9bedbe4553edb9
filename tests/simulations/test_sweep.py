"""Sweeps: the grid x seeds, one folder per run, finished runs skipped on a re-run."""

import json
import subprocess
import sys

import pytest

from finetune.config import ConfigError
from simulations.experiment import load_experiment
from simulations.sweep import plan_sweep, run_sweep

EXPERIMENT = """
model = "tiny"
clients = 6

[population]
deadline = 30.0

[[profiles]]
name = "only"
share = 1.0

[sweep]
aggregation = ["fedavg", "hetlora"]
dirichlet-alpha = [0.1, 1.0]
dp = ["none", "local"]
seeds = [0, 1]
"""


@pytest.fixture
def experiment(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(EXPERIMENT)
    return path


def test_grid_times_seeds_one_folder_each(experiment, tmp_path):
    runs = plan_sweep(load_experiment(experiment), tmp_path / "out")
    assert len(runs) == 2 * 2 * 2 * 2
    assert len({r.folder for r in runs}) == 16
    run = next(r for r in runs if r.name == "aggregation-hetlora_dirichlet-alpha-0.1_dp-local_seed-1")
    assert (run.config.aggregation, run.config.dirichlet_alpha, run.config.dp, run.config.seed) == ("hetlora", 0.1, "local", 1)
    assert run.config.clients == 6 and run.config.experiment == str(experiment.resolve())
    assert run.folder == tmp_path / "out" / run.name


def fake_simulate(run):
    """Stands in for a `fedsite simulate` process: writes what a finished run leaves."""
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "summary.json").write_text(json.dumps({"seed": run.config.seed}))
    return 0


def test_finished_runs_are_skipped(experiment, tmp_path):
    out = tmp_path / "out"
    calls = []

    def crash_on_local_dp(run):
        calls.append(run.name)
        return 1 if run.config.dp == "local" else fake_simulate(run)

    first = run_sweep(experiment, out, runner=crash_on_local_dp)
    assert [s for _, s in first].count("done") == 8 and [s for _, s in first].count("failed (1)") == 8
    calls.clear()
    second = run_sweep(experiment, out, runner=fake_simulate)
    assert len(calls) == 0 and [s for _, s in second].count("skipped") == 8 and [s for _, s in second].count("done") == 8
    assert all(status == "skipped" for _, status in run_sweep(experiment, out, runner=fake_simulate))


def test_experiment_without_sweep_is_one_run(tmp_path):
    path = tmp_path / "one.toml"
    path.write_text('model = "tiny"\nseed = 4\n')
    runs = plan_sweep(load_experiment(path), tmp_path / "out")
    assert [r.name for r in runs] == ["seed-4"]


def test_bad_sweep_value_stops_before_any_run(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[sweep]\nlora-rank = [8, 0]\n')
    with pytest.raises(ConfigError, match="lora-rank"):
        run_sweep(path, tmp_path / "out", runner=fake_simulate)
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_lists_runs(experiment, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedsite", "sweep", str(experiment), "--out", str(tmp_path / "out"), "--dry-run"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("planned") == 16 and "16 runs, 0 failed" in proc.stdout
