"""Experiment files: tables parsed into config + population + sweep; the shipped example runs."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from finetune.config import ConfigError
from simulations.experiment import load_experiment, parse_experiment

MIXED = Path(__file__).parents[2] / "simulations" / "experiments" / "mixed_devices.toml"


def test_shipped_example_parses():
    experiment = load_experiment(MIXED)
    assert experiment.config.clients == 200 and experiment.config.aggregation == "hetlora"
    assert experiment.config.experiment == str(MIXED.resolve())
    assert [p.name for p in experiment.profiles] == ["workstation", "laptop", "phone", "kiosk"]
    assert experiment.population().counts() == {"workstation": 40, "laptop": 60, "phone": 80, "kiosk": 20}
    assert experiment.deadline == 120.0 and experiment.sweep.seeds == [0, 1]


def test_flat_file_is_an_experiment_without_population(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text('model = "tiny"\nclients = 7\n')
    experiment = load_experiment(path)
    assert experiment.config.clients == 7 and experiment.config.experiment == "" and experiment.sweep is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"populaton": {"clients": 3}}, "unknown table [populaton]"),
        ({"population": {"clients": 3, "deadlines": 1.0}}, "unknown key 'deadlines' in [population]"),
        ({"population": {"deadline": "soon"}}, "deadline = 'soon' is not a number"),
        ({"profiles": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.3}]}, "shares must sum to 1, got 0.8"),
        ({"sweep": {"aggregaton": ["fedavg"]}}, "unknown config field 'aggregaton'"),
        ({"sweep": {"aggregation": ["fedavg", "nope"]}}, "'aggregation' = 'nope' must be one of"),
        ({"sweep": {"dp": "local"}}, "[sweep] dp = 'local' must be a non-empty list"),
        ({"sweep": {"seeds": [0.5]}}, "seeds = [0.5] must be a non-empty list of integers"),
    ],
)
def test_mistakes_are_named(values, message):
    with pytest.raises(ConfigError) as err:
        parse_experiment(values)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_reports_a_bad_experiment_in_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[profiles]]\nname = "a"\nshare = 0.6\n')
    proc = subprocess.run([sys.executable, "-m", "fedsite", "simulate", "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fedsite: error:") and "shares must sum to 1" in proc.stderr


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """The shipped example scaled down: 50 clients on the tiny Llama, 10 sampled per round."""
    root = tmp_path_factory.mktemp("mixed")
    values = tomllib.loads(MIXED.read_text())
    values.pop("sweep")
    values["population"].update(clients=50, deadline=1.5)
    (root / "mixed.toml").write_text(tomli_w.dumps(values))
    out = root / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsite", "simulate", "--config", str(root / "mixed.toml"), "--out", str(out),
         "--model", "tiny", "--rounds", "2", "--fraction-train", "0.2", "--local-steps", "2", "--train-per-task", "40",
         "--test-per-task", "4", "--eval-examples", "8", "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_mixed_devices_run_records_the_population(mixed_run):
    out, proc = mixed_run
    baseline, *rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clients = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    assert baseline["round"] == 0 and "profiles" not in baseline
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["sampled"] == 10
        replied = [c for c in clients if c["round"] == row["round"]]
        assert len(row["unavailable"]) + len(row["dropped"]) + len(replied) == 10
        assert sum(row["profiles"].values()) == len(replied)
        assert row["simulated_seconds"] > 0 and row["download_bytes"] > 0
        if row["dropped"] or row["stragglers"]:
            assert row["simulated_seconds"] == 1.5  # the coordinator waited until the deadline
    assert not [c["reason"][:300] for c in clients if "client error" in c.get("reason", "")]
    for c in clients:
        late = c["simulated_seconds"] > 1.5
        assert late == ("straggler" in c.get("reason", ""))
        assert c["lora_rank"] == (4 if c["profile"] in ("phone", "kiosk") else 8)
        assert c["quantize"] == ("nf4" if c["profile"] == "phone" else "none")
        assert c["package_kind"] == ("emulator" if c["profile"] == "kiosk" else "lora")
    assert "training (" in (out / "logs" / "fedsite.log").read_text()  # per-round progress with profile counts, in the run's log (the console stays quiet)


def test_report_shows_population_plots(mixed_run, tmp_path):
    out, _ = mixed_run
    proc = subprocess.run([sys.executable, "-m", "fedsite", "report", str(out), "--out", str(tmp_path / "report")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["runs"][0]["time_basis"] == "simulated"
    for name in ("participation.png", "time_to_accuracy.png", "report.md"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_the_energy_experiment_parses_power_figures_and_its_selection_sweep():
    from pathlib import Path

    from simulations.experiment import load_experiment

    experiment = load_experiment(Path(__file__).parents[2] / "simulations/experiments/energy.toml")
    phone = experiment.population().profiles_by_name["phone-solar"]
    assert (phone.train_watts, phone.joules_per_mb_sent, phone.battery_wh, phone.carbon_intensity) == (3.0, 2.0, 0.02, 40.0)
    assert experiment.config.client_selection == "energy-aware" and experiment.sweep.grid == {"client-selection": ["uniform", "energy-aware"]}
