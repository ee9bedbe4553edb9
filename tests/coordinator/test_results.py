"""coordinator/results.py: the baseline row, per-round times, summary.md and curves.png."""

import json

import matplotlib.pyplot as plt
import pytest

from coordinator.results import TINY_NOTE, RunRecorder, curves_figure, summary_markdown
from finetune.config import FedsiteConfig


def recorded_run(tmp_path, model="tiny", rounds=3):
    config = FedsiteConfig(model=model, out=str(tmp_path), num_server_rounds=rounds)
    recorder = RunRecorder(tmp_path, config)
    recorder.finish_round(0, {"eval_loss": 3.0, "eval_accuracy": 0.0, "eval_seconds": 2.5})
    for r in range(1, rounds + 1):
        recorder.record(train_loss=2.0 / r, contributors=[0, 1], rejected=[], upload_bytes=1000, train_seconds=4.0, federated_eval_seconds=1.0)
        recorder.finish_round(r, {"eval_loss": 2.0 / r, "eval_accuracy": 0.1 * r, "eval_seconds": 2.0, "round_seconds": 5.5})
    return config, recorder


def test_metrics_jsonl_starts_with_the_baseline_row_without_training_keys(tmp_path):
    _, recorder = recorded_run(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[0] == {"round": 0, "eval_loss": 3.0, "eval_accuracy": 0.0, "eval_seconds": 2.5}
    assert recorder.initial == {"eval_loss": 3.0, "eval_accuracy": 0.0, "eval_seconds": 2.5}
    assert [r["round"] for r in recorder.rounds] == [1, 2, 3]  # summary.json's "rounds" counts training rounds
    assert rows[1]["total_seconds"] == pytest.approx(7.5)  # round start to the end of its central evaluation


def test_summary_md_gives_train_eval_and_total_seconds(tmp_path):
    config, recorder = recorded_run(tmp_path)
    recorder.write_summary()
    text = (tmp_path / "summary.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| round"))
    assert header.endswith("| train s | eval s | total s |")
    rows = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert rows and rows[0].endswith("| 4.0 | 3.0 | 7.5 |")  # eval = central 2.0 + federated 1.0
    [baseline] = [line for line in text.splitlines() if line.startswith("| 0 (baseline) | 0.000 | 3.000 |")]
    assert baseline.endswith("| – | 2.5 | 2.5 |")  # no training; its evaluation is its total


def test_tiny_runs_say_they_are_plumbing_checks(tmp_path):
    tiny, _ = recorded_run(tmp_path / "a")
    assert TINY_NOTE in summary_markdown(tiny, None, []) and "0.000" in TINY_NOTE
    assert TINY_NOTE not in summary_markdown(FedsiteConfig(model="smollm2"), None, [])


@pytest.mark.parametrize("rounds", [1, 3, 7])
def test_curves_have_integer_round_ticks_titles_and_units(tmp_path, rounds):
    _, recorder = recorded_run(tmp_path, rounds=rounds)
    fig = curves_figure(recorder.rounds, recorder.initial, "a run")
    fig.canvas.draw()
    assert fig._suptitle.get_text() == "a run"
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert ax.get_title() and ax.get_xlabel().startswith("round") and "(" in ax.get_ylabel()  # a unit in brackets
    assert "nats" in fig.axes[1].get_ylabel() and "fraction" in fig.axes[0].get_ylabel()
    plt.close(fig)
    recorder.write_summary()
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
