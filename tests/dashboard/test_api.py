"""The dashboard's JSON endpoints over results folders: a run, a sweep, a run still being written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from dashboard.app import create_app
from dashboard.runs import RunIndex
from tests.dashboard.helpers import client_rows, make_run, round_row, write_jsonl


def strict_json(text: str):
    """What a browser's JSON.parse accepts: no NaN or Infinity."""

    def refuse(name: str):
        raise AssertionError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def client_for(*folders: Path, **kwargs) -> TestClient:
    return TestClient(create_app(RunIndex(list(folders)), **kwargs))


def the_run(client: TestClient, name: str | None = None) -> dict:
    listing = strict_json(client.get("/api/runs").text)["runs"]
    return listing[0] if name is None else next(r for r in listing if r["name"] == name)


def test_a_run_lists_its_rounds_from_metrics_jsonl(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "run", rounds=3)
    client = client_for(folder)
    response = client.get("/api/runs")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    (run,) = strict_json(response.text)["runs"]
    expected = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert run["name"] == "run" and run["status"] == "finished" and run["total_rounds"] == 3
    assert [r["round"] for r in run["rounds"]] == [1, 2, 3]
    assert [r["eval_loss"] for r in run["rounds"]] == [e["eval_loss"] for e in expected]
    assert [r["contributors"] for r in run["rounds"]] == [3, 3, 3] and run["rounds"][0]["rejections"][0]["reason"].startswith("update norm")
    assert run["initial"]["eval_loss"] == 4.5

    overview = strict_json(client.get(f"/api/runs/{run['id']}").text)
    assert (overview["round"], overview["total_rounds"], overview["status"], overview["eta_seconds"]) == (3, 3, "finished", None)
    assert overview["latest"]["eval_loss"] == expected[-1]["eval_loss"] and overview["client_rows"] == 12
    assert strict_json(client.get(f"/api/runs/{run['id']}/config").text)["config"]["num-server-rounds"] == 3
    assert [r["round"] for r in strict_json(client.get(f"/api/runs/{run['id']}/rounds").text)["rounds"]] == [1, 2, 3]

    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/static/plotly.min.js?v=' in page.text and "cdn" not in page.text.lower()
    plotly = client.get("/static/plotly.min.js")
    assert plotly.status_code == 200 and plotly.headers["content-encoding"] == "gzip" and len(plotly.content) > 1_000_000
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_a_sweep_folder_expands_into_its_runs_and_new_ones_appear(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_run(sweep / "lr-0.01_seed-0", loss0=4.0)
    make_run(sweep / "lr-0.1_seed-0", loss0=5.0)
    (sweep / "notes.txt").write_text("not a run")
    (sweep / "empty").mkdir()
    make_run(sweep / ".hidden")
    index = RunIndex([sweep])
    client = TestClient(create_app(index))
    names = [r["name"] for r in strict_json(client.get("/api/runs").text)["runs"]]
    assert names == ["sweep/lr-0.01_seed-0", "sweep/lr-0.1_seed-0"]
    make_run(sweep / "lr-1_seed-0", rounds=1, total=3, finished=False)
    index.rescan(force=True)
    listing = strict_json(client.get("/api/runs").text)["runs"]
    assert [r["name"] for r in listing][-1] == "sweep/lr-1_seed-0" and listing[-1]["status"] == "in progress"
    assert len({r["id"] for r in listing}) == 3 and all(r["id"].startswith("r") and "/" not in r["id"] for r in listing)


def test_a_partly_written_run_shows_what_is_complete(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "live", rounds=2, total=5, finished=False)
    line = json.dumps(round_row(3, 4, loss=3.9))
    client_line = json.dumps(client_rows(3, 4)[0])
    with (folder / "metrics.jsonl").open("a") as f:
        f.write(line[:25])  # a round being written right now
    with (folder / "clients.jsonl").open("a") as f:
        f.write(client_line[:40])
    client = client_for(folder)
    run = the_run(client)
    assert [r["round"] for r in run["rounds"]] == [1, 2] and run["status"] == "in progress"
    overview = strict_json(client.get(f"/api/runs/{run['id']}").text)
    assert (overview["round"], overview["total_rounds"], overview["client_rows"]) == (2, 5, 8)
    assert overview["eta_seconds"] is not None and overview["skipped_lines"] == {}
    page = strict_json(client.get(f"/api/runs/{run['id']}/clients?limit=500").text)
    assert page["total"] == 8 and page["rounds"] == [1, 2]

    with (folder / "metrics.jsonl").open("a") as f:
        f.write(line[25:] + "\n")  # the line is finished: round 3 appears, read incrementally
    with (folder / "clients.jsonl").open("a") as f:
        f.write(client_line[40:] + "\n")
    run = the_run(client)
    assert [r["round"] for r in run["rounds"]] == [1, 2, 3] and run["rounds"][-1]["eval_loss"] == 3.9
    assert strict_json(client.get(f"/api/runs/{run['id']}/clients").text)["total"] == 9

    write_jsonl(folder / "metrics.jsonl", [round_row(1, 4, loss=9.0)])  # a fresh start rewrites the file
    assert [r["eval_loss"] for r in the_run(client)["rounds"]] == [9.0]


def test_a_run_folder_before_its_first_round(tmp_path: Path) -> None:
    folder = tmp_path / "starting"
    index = RunIndex([], live=[folder])  # what `fedsite simulate --dashboard` serves before the run writes anything
    client = TestClient(create_app(index))
    run = the_run(client)
    assert run["rounds"] == [] and run["status"] == "starting"
    overview = strict_json(client.get(f"/api/runs/{run['id']}").text)
    assert overview["round"] == 0 and overview["elapsed_seconds"] is None
    make_run(folder, rounds=1, total=2, finished=False)
    assert [r["round"] for r in the_run(client)["rounds"]] == [1]


def test_malformed_lines_are_skipped_not_fatal(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "run", rounds=2)
    with (folder / "metrics.jsonl").open("a") as f:
        f.write("not json at all\n[1, 2]\n{\"round\": \"three\"}\n\xff\xfe\n")
        f.write('{"round": 3, "eval_loss": NaN, "eval_accuracy": Infinity, "upload_bytes": 1e400, "contributors": "x"}\n')
    with (folder / "clients.jsonl").open("ab") as f:
        f.write(b'{"round": 1, "client_id": "<img src=x onerror=alert(1)>", "num_examples": [1], "train_loss": {"a": 1}}\n\x00garbage\n')
    (folder / "summary.json").write_text('{"initial": ')  # half-written (atomic writes make this rare)
    client = client_for(folder)
    run = the_run(client)
    assert [r["round"] for r in run["rounds"]] == [1, 2, 3]
    assert run["rounds"][-1]["eval_loss"] is None and run["rounds"][-1]["eval_accuracy"] is None and run["rounds"][-1]["contributors"] is None
    overview = strict_json(client.get(f"/api/runs/{run['id']}").text)
    assert overview["skipped_lines"] == {"metrics.jsonl": 3, "clients.jsonl": 1} and overview["status"] == "in progress"
    rows = strict_json(client.get(f"/api/runs/{run['id']}/clients?round=1&limit=500").text)["rows"]
    odd = next(r for r in rows if r["examples"] is None)
    assert odd["client"] == "<img src=x onerror=alert(1)>" and odd["train_loss"] is None  # text for the page to show as text


def test_the_client_table_sorts_filters_and_pages_on_the_server(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "run", rounds=3, clients=12)
    client = client_for(folder)
    run_id = the_run(client)["id"]
    page = strict_json(client.get(f"/api/runs/{run_id}/clients?sort=seconds&order=desc&limit=5").text)
    assert page["total"] == 36 and page["matching"] == 36 and len(page["rows"]) == 5
    assert [r["seconds"] for r in page["rows"]] == sorted([r["seconds"] for r in page["rows"]], reverse=True)
    assert page["rows"][0]["client"] == "11"
    assert page["rows"][0]["node_id"] == str(10303185501554209682 + 11)  # past 2**53: a string, exact
    rejected = strict_json(client.get(f"/api/runs/{run_id}/clients?round=2&status=rejected").text)
    assert [(r["round"], r["client"], r["reason"]) for r in rejected["rows"]] == [(2, "11", "update norm 9.1 > max-update-norm 1")]
    assert rejected["statuses"] == {"accepted": 11, "rejected": 1} and rejected["reasons"] == {"update norm 9.1 > max-update-norm 1": 1}
    by_client = strict_json(client.get(f"/api/runs/{run_id}/clients?round=1&sort=client").text)["rows"]
    assert [r["client"] for r in by_client] == [str(c) for c in range(12)]  # '10' after '9'
    second = strict_json(client.get(f"/api/runs/{run_id}/clients?sort=client&offset=30&limit=10").text)
    assert len(second["rows"]) == 6 and second["offset"] == 30
    for bad in ("offset=-x", "limit=1e9", "order=sideways", "round=1;2"):
        assert client.get(f"/api/runs/{run_id}/clients?{bad}").status_code == 400


def test_privacy_ledger_per_client_against_the_budget(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "dp", rounds=3, clients=4, dp=True)
    client = client_for(folder)
    privacy = strict_json(client.get(f"/api/runs/{the_run(client)['id']}/privacy").text)
    assert privacy["present"] and privacy["budget"] == 2.0 and privacy["clients"] == 4 and privacy["delta"] == 1e-5
    assert privacy["traces"]["3"] == [[1, 0.8], [2, pytest.approx(1.3)], [3, pytest.approx(1.8)]]
    assert privacy["run_epsilon"] == pytest.approx(1.8) and privacy["run_epsilon_basis"] == "largest client"
    assert [p[0] for p in privacy["run_series"]] == [1, 2, 3] and privacy["run_series"][-1][1] == pytest.approx(1.8)
    assert privacy["over_budget"] == [] and privacy["latest"][0]["client"] == "3"
    with (folder / "privacy.jsonl").open("a") as f:
        f.write(json.dumps({"round": 4, "client": 2, "mechanism": "local-dp-sgd", "delta": 1e-5, "epsilon": 2.4}) + "\n")
    privacy = strict_json(client.get(f"/api/runs/{the_run(client)['id']}/privacy").text)
    assert privacy["over_budget"] == ["2"] and privacy["run_epsilon"] == 2.4
    plain = client_for(make_run(tmp_path / "plain"))
    assert strict_json(plain.get(f"/api/runs/{the_run(plain)['id']}/privacy").text)["present"] is False


def test_offsite_metrics_when_present(tmp_path: Path) -> None:
    client = client_for(make_run(tmp_path / "mixed", rounds=2, offsite=True))
    offsite = strict_json(client.get(f"/api/runs/{the_run(client)['id']}/offsite").text)
    assert offsite["present"] and [r["offsite_eval_accuracy"] for r in offsite["rounds"]] == [0.05, 0.1]
    assert [r["emulator_clients"] for r in offsite["rounds"]] == [2, 2] and offsite["initial"]["emulator_eval_loss"] == 4.6
    assert offsite["package"] == {"ratio": 0.4, "emulator_bytes": 1000, "backbone_bytes": 2500}  # no key paths
    plain = client_for(make_run(tmp_path / "plain"))
    assert strict_json(plain.get(f"/api/runs/{the_run(plain)['id']}/offsite").text)["present"] is False


def test_unchanged_answers_are_304_and_the_app_is_read_only(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "run", rounds=1, total=3, finished=False)
    client = client_for(folder)
    first = client.get("/api/runs")
    again = client.get("/api/runs", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    with (folder / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(round_row(2, 4, loss=4.0)) + "\n")
    assert client.get("/api/runs", headers={"If-None-Match": first.headers["etag"]}).status_code == 200
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert client.request(method, "/api/runs").status_code == 405
    assert client.get("/api/runs/r000000000000").status_code == 404


def test_links_outside_the_given_folders_are_not_followed(tmp_path: Path) -> None:
    outside = make_run(tmp_path / "outside", loss0=7.0)
    sweep = tmp_path / "sweep"
    make_run(sweep / "real")
    os.symlink(outside, sweep / "link-out")
    os.symlink(sweep / "real", sweep / "link-in")  # inside the root: the same run, listed once
    planted = make_run(sweep / "planted")
    (planted / "metrics.jsonl").unlink()
    os.symlink(outside / "metrics.jsonl", planted / "metrics.jsonl")
    client = client_for(sweep)
    listing = strict_json(client.get("/api/runs").text)["runs"]
    assert sorted(r["name"] for r in listing) == ["sweep/planted", "sweep/real"]
    assert next(r for r in listing if r["name"] == "sweep/planted")["rounds"] == []  # the linked file is not read
    assert all(r["initial"]["eval_loss"] != 7.0 for r in listing)


def test_only_the_command_line_imports_the_dashboard() -> None:
    """DESIGN: the run's own code paths (coordinator, client, ...) never import the dashboard."""
    root = Path(__file__).resolve().parents[2]
    for package in ("coordinator", "client", "finetune", "aggregation", "protos", "emulator", "simulations"):
        for source in (root / package).rglob("*.py"):
            text = source.read_text()
            assert "import dashboard" not in text and "from dashboard" not in text, source


def test_the_baseline_row_is_the_initial_evaluation_not_a_round(tmp_path: Path) -> None:
    """metrics.jsonl starts with round 0 (evaluation only, no training keys): while the run is live
    it is the run's initial evaluation; it is never counted as a round."""
    folder = make_run(tmp_path / "live", rounds=2, total=5, finished=False)
    rows = (folder / "metrics.jsonl").read_text()
    baseline = {"round": 0, "eval_loss": 4.9, "eval_accuracy": 0.0, "eval_per_task": {"sort": 0.0}, "eval_seconds": 1.5}
    (folder / "metrics.jsonl").write_text(json.dumps(baseline) + "\n" + rows)
    client = client_for(folder)
    run = the_run(client)
    assert [r["round"] for r in run["rounds"]] == [1, 2] and run["initial"] == {"eval_loss": 4.9, "eval_accuracy": 0.0, "eval_seconds": 1.5}
    overview = strict_json(client.get(f"/api/runs/{run['id']}").text)
    assert (overview["round"], overview["rounds_recorded"], overview["status"]) == (2, 2, "in progress")
    assert overview["initial"]["eval_loss"] == 4.9 and overview["eta_seconds"] is not None
    assert [r["round"] for r in strict_json(client.get(f"/api/runs/{run['id']}/rounds").text)["rounds"]] == [1, 2]
    offsite = strict_json(client.get(f"/api/runs/{run['id']}/offsite").text)
    assert [r["round"] for r in offsite["rounds"]] == [1, 2] and offsite["initial"]["eval_loss"] == 4.9

    only = make_run(tmp_path / "starting", rounds=0, total=3, finished=False)
    (only / "metrics.jsonl").write_text(json.dumps(baseline) + "\n")  # the baseline is written, round 1 is running
    run = the_run(client_for(only))
    assert run["rounds"] == [] and run["initial"]["eval_loss"] == 4.9 and run["status"] == "starting"
