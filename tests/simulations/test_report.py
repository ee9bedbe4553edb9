"""`simulations.report`: comparing results folders written by hand, no model or Flower involved."""

import json

import pytest

from simulations.report import PLOTS, ReportError, load_run, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(folder, accuracies, *, upload=1_000_000, initial=0.1, extra=None, config=None):
    """A 3-round results folder as RunRecorder leaves it; `extra` adds fields to every round."""
    folder.mkdir(parents=True)
    rounds = []
    for i, acc in enumerate(accuracies, start=1):
        row = {
            "round": i, "eval_loss": 2.0 / i, "eval_accuracy": acc,
            "eval_per_task": {"arithmetic": acc, "reverse": acc / 2},
            "train_loss": 2.5 / i, "sampled": 4, "contributors": [0, 1, 2], "rejected": [{"client": 3, "reason": "norm"}],
            "upload_bytes": upload, "round_seconds": 10.0, "aggregation_seconds": 0.01,
            **(extra or {}),
        }
        rounds.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    clients = [{"round": r["round"], "node_id": c, "client_id": c, "num_examples": 10, "train_loss": 1.0, "steps": 4,
                "train_seconds": 1.0, "upload_bytes": upload // 3, "status": "accepted", "reason": ""}
               for r in rounds for c in r["contributors"]]
    (folder / "clients.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clients))
    init = {"eval_loss": 3.0, "eval_accuracy": initial, "eval_per_task": {"arithmetic": initial, "reverse": 0.0}}
    (folder / "summary.json").write_text(json.dumps({"initial": init, "final": rounds[-1], "rounds": 3}))
    (folder / "config.toml").write_text(config if config is not None else (
        'model = "tiny"\nclients = 8\nnum-server-rounds = 3\npartitioning = "dirichlet"\n'
        'dirichlet-alpha = 0.5\nlocal-steps = 4\nlr = 0.01\nlora-rank = 8\naggregation = "fedavg"\n'))
    return folder


@pytest.fixture()
def two_runs(tmp_path):
    iid = write_run(tmp_path / "iid-fedavg", [0.2, 0.5, 0.4], upload=2_000_000)
    trimmed = write_run(tmp_path / "noniid-trimmed", [0.3, 0.35, 0.6], initial=0.05,
                        extra={"simulated_seconds": 30.0, "dropped": [5], "download_bytes": 500_000},
                        config='model = "tiny"\nclients = 8\npartitioning = "iid"\naggregation = "trimmed_mean"\n'
                               'dp = "local"\nupload-codec = "int8"\n')
    return iid, trimmed


def test_report_writes_plots_markdown_and_json(two_runs, tmp_path):
    out = tmp_path / "report"
    md_path = write_report(two_runs, out)
    assert md_path == out / "report.md"
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # every figure closed after saving
    for name in PLOTS:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000, name

    md = md_path.read_text()
    assert "iid-fedavg" in md and "noniid-trimmed" in md
    assert "| 0.400 |" in md and "| 0.600 |" in md  # final accuracies
    assert "0.500 (2)" in md and "0.600 (3)" in md  # best accuracy (round)
    assert "6.00" in md and "3.00" in md  # total upload MB
    assert "dirichlet(α=0.5)" in md and "trimmed_mean" in md and "int8" in md
    assert "90.0 (sim)" in md and "| 30.0 |" in md  # simulated time preferred over wall-clock
    assert "## Final accuracy per task" in md and "| arithmetic |" in md
    for name in PLOTS:
        assert f"({name}.png)" in md

    runs = {r["name"]: r for r in json.loads((out / "report.json").read_text())["runs"]}
    a, b = runs["iid-fedavg"], runs["noniid-trimmed"]
    assert a["total_upload_bytes"] == 6_000_000 and b["total_upload_bytes"] == 3_000_000
    assert (a["best_accuracy"], a["best_round"]) == (0.5, 2) and (b["best_accuracy"], b["best_round"]) == (0.6, 3)
    assert a["initial_accuracy"] == 0.1 and a["final_accuracy"] == 0.4 and a["final_eval_loss"] == pytest.approx(2 / 3)
    assert a["total_seconds"] == 30.0 and a["time_basis"] == "wall"
    assert b["total_seconds"] == 90.0 and b["time_basis"] == "simulated"
    assert a["total_download_bytes"] is None and b["total_download_bytes"] == 1_500_000
    assert a["rejected_updates"] == 3 and b["dropped"] == 3 and a["dropped"] == 0
    assert a["mean_contributors"] == 3 and a["participation_rate"] == 0.75
    assert a["config"]["rounds"] == 3 and b["config"]["dp"] == "local" and a["config"]["dp"] is None
    assert b["final_per_task"] == {"arithmetic": 0.6, "reverse": 0.3}


def test_best_round_can_be_the_baseline(tmp_path):
    run = write_run(tmp_path / "worse", [0.1, 0.2, 0.3], initial=0.9)
    summary = json.loads((write_report([run], tmp_path / "out").parent / "report.json").read_text())["runs"][0]
    assert (summary["best_accuracy"], summary["best_round"]) == (0.9, 0)


def test_malformed_line_names_file_and_line(tmp_path):
    run = write_run(tmp_path / "bad", [0.1, 0.2, 0.3])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-5]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=r"metrics\.jsonl: line 2: not valid JSON") as info:
        write_report([run], tmp_path / "out")
    assert "\n" not in str(info.value) and str(run) in str(info.value)


def test_round_without_number_is_rejected(tmp_path):
    run = write_run(tmp_path / "bad", [0.1, 0.2, 0.3])
    (run / "metrics.jsonl").write_text('{"eval_accuracy": 0.1}\n')
    with pytest.raises(ReportError, match="integer 'round'"):
        load_run(run)


def test_folder_without_metrics_errors_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"empty/metrics\.jsonl: not found"):
        write_report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(ReportError, match="no results folders"):
        write_report([], tmp_path / "out")


def test_minimal_rounds_without_optional_files_or_fields(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"round": 1, "eval_loss": 1.5, "eval_accuracy": 0.2}\n\n{"round": 2, "eval_loss": 1.0, "eval_accuracy": 0.3}\n')
    data = load_run(run)
    assert (data.name, data.config, data.clients, data.initial) == ("bare", {}, [], None)
    out = tmp_path / "out"
    md = write_report([run], out).read_text()
    for name in PLOTS:
        assert (out / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "bare" in md and "Final accuracy per task" not in md
    summary = json.loads((out / "report.json").read_text())["runs"][0]
    assert summary["final_accuracy"] == 0.3 and summary["best_round"] == 2 and summary["initial_accuracy"] is None
    assert summary["total_upload_bytes"] == 0 and summary["total_seconds"] is None and summary["rejected_updates"] == 0


def test_same_folder_names_get_distinct_labels(tmp_path):
    a = write_run(tmp_path / "exp1" / "run", [0.1, 0.2, 0.3])
    b = write_run(tmp_path / "exp2" / "run", [0.1, 0.2, 0.4])
    write_report([a, b], tmp_path / "out")
    names = [r["name"] for r in json.loads((tmp_path / "out" / "report.json").read_text())["runs"]]
    assert names == ["exp1/run", "exp2/run"]


def test_the_baseline_row_of_metrics_jsonl_is_the_initial_evaluation(tmp_path):
    """metrics.jsonl's round-0 row has no training keys; without summary.json (a run in progress) it is the baseline."""
    run = write_run(tmp_path / "live", [0.2, 0.5, 0.4], initial=0.3)
    (run / "summary.json").unlink()
    rows = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "eval_loss": 3.5, "eval_accuracy": 0.05, "eval_seconds": 1.0}) + "\n" + rows)
    data = load_run(run)
    assert [r["round"] for r in data.rounds] == [1, 2, 3] and data.initial["eval_accuracy"] == 0.05
    write_report([run], tmp_path / "report")
    [summary] = json.loads((tmp_path / "report" / "report.json").read_text())["runs"]
    assert summary["initial_accuracy"] == 0.05 and summary["rounds_run"] == 3 and summary["mean_contributors"] == 3.0
    assert summary["total_seconds"] == 30.0 and summary["time_basis"] == "wall"  # round_seconds: no total_seconds here

    with_totals = write_run(tmp_path / "totals", [0.2, 0.5, 0.4], extra={"total_seconds": 14.0})  # central evaluation included
    assert write_report([with_totals], tmp_path / "r2") and json.loads((tmp_path / "r2" / "report.json").read_text())["runs"][0]["total_seconds"] == 42.0


def test_round_axes_of_every_report_plot_have_integer_ticks_and_a_title(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    seen = {}
    save = Figure.savefig

    def check_then_save(fig, path, *args, **kwargs):
        fig.canvas.draw()
        visible = [ax for ax in fig.axes if ax.get_visible()]
        # a twin axis (a second y scale over the same rounds, e.g. energy.png's gCO2e) belongs to the axis it twins
        axes = [ax for i, ax in enumerate(visible) if not any(ax.get_shared_x_axes().joined(ax, other) for other in visible[:i])]
        seen[str(path).rsplit("/", 1)[-1]] = {
            "titled": all(ax.get_title() for ax in axes),
            "labelled": all(ax.get_xlabel() and ax.get_ylabel() for ax in axes if ax.get_xlabel() != "round" or ax is axes[0]),
            "ticks": [t for ax in axes if ax.get_xlabel() == "round" for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]],
        }
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", check_then_save)
    run = write_run(tmp_path / "one", [0.2, 0.5, 0.4])
    write_report([run], tmp_path / "report")
    assert set(seen) == {f"{name}.png" for name in PLOTS}
    for name, facts in seen.items():
        assert facts["titled"] and facts["labelled"], name
        assert all(float(t).is_integer() for t in facts["ticks"]), (name, facts["ticks"])
    assert seen["accuracy.png"]["ticks"] and seen["participation.png"]["ticks"]
