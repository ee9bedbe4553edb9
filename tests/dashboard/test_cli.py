"""The command line's front door: `fedsite dashboard`, `simulate --dashboard`, `coordinator --dashboard`."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from dashboard import DEFAULT_ADDRESS
from fedsite.cli import build_parser, main
from tests.dashboard.helpers import make_run


def test_options_parse() -> None:
    parser = build_parser()
    assert parser.parse_args(["simulate"]).dashboard is None
    assert parser.parse_args(["simulate", "--dashboard"]).dashboard == DEFAULT_ADDRESS
    args = parser.parse_args(["simulate", "--dashboard", "0.0.0.0:9000", "--dashboard-certs", "certs"])
    assert (args.dashboard, args.dashboard_certs) == ("0.0.0.0:9000", "certs")
    assert parser.parse_args(["coordinator", "--dashboard", "--certs", "c"]).dashboard == DEFAULT_ADDRESS
    args = parser.parse_args(["dashboard", "a", "b"])
    assert (args.folders, args.address, args.certs) == (["a", "b"], DEFAULT_ADDRESS, None)


@pytest.mark.parametrize("argv", [["dashboard", "--help"], ["simulate", "--help"], ["coordinator", "--help"]])
def test_help_names_the_dashboard(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(argv)
    assert done.value.code == 0 and "dashboard" in capsys.readouterr().out


def test_simulate_serves_the_dashboard_before_and_during_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """The dashboard is up (and printed) before the run starts, and serves the run's folder as it grows."""
    out = tmp_path / "run"
    seen = {}

    def fake_simulate(config, verbose=False):
        url = re.search(r"dashboard: (http://\S+)", capsys.readouterr().out).group(1)
        seen["before"] = httpx.get(url + "api/runs").json()["runs"]
        make_run(Path(config.out), rounds=1, total=2, finished=False)
        seen["during"] = httpx.get(url + "api/runs").json()["runs"]
        return Path(config.out)

    monkeypatch.setattr("simulations.runner.simulate", fake_simulate)
    assert main(["simulate", "--model", "tiny", "--rounds", "2", "--out", str(out), "--dashboard", "127.0.0.1:0"]) == 0
    assert [(r["name"], r["status"], r["rounds"]) for r in seen["before"]] == [("run", "starting", [])]
    assert [r["round"] for r in seen["during"][0]["rounds"]] == [1]


def test_off_loopback_without_tls_is_refused_before_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    ran = []
    monkeypatch.setattr("simulations.runner.simulate", lambda *a, **k: ran.append(1))
    monkeypatch.setattr("coordinator.service.run_coordinator", lambda *a, **k: ran.append(1) or 0)
    assert main(["simulate", "--model", "tiny", "--out", str(tmp_path / "a"), "--dashboard", "0.0.0.0:0"]) == 2
    err = capsys.readouterr().err
    assert "off loopback: it needs TLS" in err and err.count("\n") == 1
    assert main(["coordinator", "--insecure", "--no-auth", "--address", "127.0.0.1:9092", "--model", "tiny", "--out", str(tmp_path / "b"),
                 "--dashboard", "192.0.2.1:0"]) == 2  # fmt: skip
    assert "off loopback: it needs TLS" in capsys.readouterr().err
    assert ran == []


def test_coordinator_serves_the_dashboard_over_its_results(tmp_path: Path, monkeypatch, capsys) -> None:
    seen = {}

    def fake_run(config, settings):
        url = re.search(r"dashboard: (http://\S+)", capsys.readouterr().out).group(1)
        seen["runs"] = httpx.get(url + "api/runs").json()["runs"]
        return 0

    monkeypatch.setattr("coordinator.service.run_coordinator", fake_run)
    make_run(tmp_path / "net", rounds=2, total=3, finished=False)
    assert main(["coordinator", "--insecure", "--no-auth", "--address", "127.0.0.1:9092", "--model", "tiny", "--out", str(tmp_path / "net"),
                 "--dashboard", "127.0.0.1:0"]) == 0  # fmt: skip
    assert [r["round"] for r in seen["runs"][0]["rounds"]] == [1, 2]
