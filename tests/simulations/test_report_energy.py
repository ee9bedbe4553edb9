"""The report's energy section and plot, from results folders written by hand."""

import json

import pytest

from simulations.report import write_report
from tests.simulations.test_report import PNG_SIGNATURE, write_run


def test_energy_totals_fairness_and_plot(tmp_path):
    uniform = write_run(tmp_path / "uniform", [0.2, 0.3, 0.4], extra={"energy_joules": 360.0, "energy_wh": 0.1, "gco2e": 0.05, "jain_index": 0.9, "client_selection": "uniform"})
    aware = write_run(tmp_path / "aware", [0.2, 0.3, 0.4], extra={"energy_joules": 180.0, "energy_wh": 0.05, "gco2e": 0.01, "jain_index": 0.8, "client_selection": "energy-aware"})
    old = write_run(tmp_path / "old", [0.1, 0.2, 0.3])  # before energy accounting: no figures, no failure
    out = tmp_path / "report"
    md = write_report([uniform, aware, old], out).read_text()
    assert "## Energy and carbon" in md
    assert "| uniform | uniform | 1080.0 | 0.3000 | 0.1500 | 0.900 |" in md
    assert "| aware | energy-aware | 540.0 | 0.1500 | 0.0300 | 0.800 |" in md
    runs = {r["name"]: r["energy"] for r in json.loads((out / "report.json").read_text())["runs"]}
    assert runs["aware"]["energy_joules"] == 540.0 and runs["aware"]["gco2e"] == pytest.approx(0.03)
    assert runs["old"]["energy_joules"] is None
    data = (out / "energy.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000
