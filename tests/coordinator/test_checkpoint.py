"""Checkpoints: what goes in comes back, writes are atomic, resume cuts files back, mismatches are refused."""

import json
import random

import numpy as np
import pytest

from aggregation.user_dp import SecureGaussian
from coordinator import checkpoint as ckpt
from coordinator.aggregate import Aggregator
from coordinator.client_dp import ClientLevelDP
from coordinator.results import RunRecorder
from finetune.config import FedsiteConfig

GLOBAL = {"l.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "l.lora_B.weight": np.ones((3, 2), np.float32)}


def finished_round(recorder: RunRecorder, server_round: int) -> None:
    recorder.record(train_loss=1.0 / server_round, contributors=[1, 2])
    recorder.record_client({"round": server_round, "node_id": 1, "status": "accepted"})
    recorder.record_privacy({"round": server_round, "client": 1, "epsilon": 0.1 * server_round})
    recorder.finish_round(server_round, {"eval_accuracy": 0.5, "eval_loss": 2.0})


def state_after_round_2(tmp_path):
    config = FedsiteConfig(out=str(tmp_path), aggregation="fedadam", num_server_rounds=4)
    recorder = RunRecorder(tmp_path, config)
    recorder.finish_round(0, {"eval_accuracy": 0.0, "eval_loss": 3.0})
    aggregator = Aggregator("fedadam")
    dp = ClientLevelDP(adaptive=True, count_stddev=1.0)
    current = GLOBAL
    for server_round in (1, 2):
        updates = [{k: v + server_round for k, v in current.items()}, {k: v - 0.5 for k, v in current.items()}]
        current = aggregator(current, updates, [1.0, 3.0], server_round)
        current, _ = dp(current, updates, 1.0)
        finished_round(recorder, server_round)
    return config, recorder, aggregator, dp, current


def test_round_trip_restores_every_part_of_the_state(tmp_path):
    config, recorder, aggregator, dp, current = state_after_round_2(tmp_path)
    random.seed(11)
    np.random.seed(12)
    ckpt.save_checkpoint(recorder, 2, current, aggregator, dp)
    expected_python, expected_numpy = random.random(), np.random.rand()

    loaded = ckpt.load_checkpoint(config)
    assert loaded.round == 2
    assert set(loaded.arrays) == set(current) and all(np.array_equal(loaded.arrays[k], current[k]) for k in current)
    resumed_recorder = RunRecorder(tmp_path, config, fresh=False)
    resumed_aggregator, resumed_dp = Aggregator("fedadam"), ClientLevelDP(adaptive=True, count_stddev=1.0)
    random.seed(0)
    np.random.seed(0)
    ckpt.restore(loaded, resumed_recorder, resumed_aggregator, resumed_dp)

    assert [r["round"] for r in resumed_recorder.rounds] == [1, 2] and resumed_recorder.initial["eval_loss"] == 3.0
    assert resumed_aggregator.state.step == aggregator.state.step == 2
    assert all(np.array_equal(resumed_aggregator.state.m[k], aggregator.state.m[k]) for k in current)
    assert (resumed_dp.clip_norm, resumed_dp.rounds) == (dp.clip_norm, 2)
    # the sampling RNGs continue exactly where the checkpoint left them; DP noise has no state to restore
    assert (random.random(), np.random.rand()) == (expected_python, expected_numpy)
    assert isinstance(resumed_dp.rng, SecureGaussian)


def test_resume_cuts_results_files_back_to_the_checkpoint(tmp_path):
    config, recorder, aggregator, dp, current = state_after_round_2(tmp_path)
    ckpt.save_checkpoint(recorder, 2, current, aggregator, dp)
    before = {name: (tmp_path / name).read_text() for name in ("metrics.jsonl", "clients.jsonl", "privacy.jsonl")}
    finished_round(recorder, 3)  # round 3 completes its files but the coordinator dies before its checkpoint
    (tmp_path / "extra.jsonl").write_text('{"round": 3}\n')

    ckpt.restore(ckpt.load_checkpoint(config), RunRecorder(tmp_path, config, fresh=False))
    assert {name: (tmp_path / name).read_text() for name in before} == before
    assert (tmp_path / "extra.jsonl").read_text() == ""
    assert [json.loads(line)["round"] for line in before["metrics.jsonl"].splitlines()] == [0, 1, 2]  # the baseline once


def test_a_resumed_run_keeps_one_baseline_row_and_no_round_twice(tmp_path):
    """The round-0 row stays the first line; after the resume the run goes on from round 3."""
    config, recorder, aggregator, dp, current = state_after_round_2(tmp_path)
    ckpt.save_checkpoint(recorder, 2, current, aggregator, dp)
    finished_round(recorder, 3)  # written, then the coordinator dies before its checkpoint
    resumed = RunRecorder(tmp_path, config, fresh=False)
    ckpt.restore(ckpt.load_checkpoint(config), resumed)
    for server_round in (3, 4):
        finished_round(resumed, server_round)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0] == {"round": 0, "eval_accuracy": 0.0, "eval_loss": 3.0}  # no training keys
    assert resumed.initial["eval_loss"] == 3.0 and [r["round"] for r in resumed.rounds] == [1, 2, 3, 4]


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config, recorder, aggregator, dp, current = state_after_round_2(tmp_path)
    ckpt.save_checkpoint(recorder, 2, current, aggregator, dp)

    def dies_halfway(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt.np, "savez", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(recorder, 3, current, aggregator, dp)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(config).round == 2


def test_no_checkpoint_means_a_fresh_run(tmp_path):
    assert ckpt.load_checkpoint(FedsiteConfig(out=str(tmp_path))) is None


def test_other_config_is_a_one_line_error_naming_the_field(tmp_path):
    config, recorder, aggregator, dp, current = state_after_round_2(tmp_path)
    ckpt.save_checkpoint(recorder, 2, current, aggregator, dp)
    with pytest.raises(ckpt.CheckpointError, match=r"lora-rank=8 but this run has lora-rank=4") as err:
        ckpt.load_checkpoint(config.replace(lora_rank=4))
    assert "\n" not in str(err.value)
    # where results go, how many rounds in all and how long to wait may change on resume
    assert ckpt.load_checkpoint(config.replace(num_server_rounds=6, round_timeout=5.0)).round == 2
    with pytest.raises(ckpt.CheckpointError, match="past num-server-rounds=1"):
        ckpt.load_checkpoint(config.replace(num_server_rounds=1))


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / ckpt.CHECKPOINT).write_bytes(b"not a zip")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint\.npz': not a Fedsite checkpoint \(not an \.npz archive\)") as err:
        ckpt.load_checkpoint(FedsiteConfig(out=str(tmp_path)))
    assert "\n" not in str(err.value)


def test_finished_run_removes_its_checkpoint(tmp_path):
    config, recorder, aggregator, dp, current = state_after_round_2(tmp_path)
    ckpt.save_checkpoint(recorder, 2, current)
    ckpt.remove_checkpoint(tmp_path)
    assert ckpt.load_checkpoint(config) is None


def test_a_checkpoint_written_before_a_field_existed_resumes_at_that_fields_default(tmp_path):
    old = FedsiteConfig(module_selection="kill-revive").to_flat()
    del old["kr-assign"]  # an older Fedsite did not know the field
    saved = ckpt.Checkpoint(1, {}, meta={"config": old})
    ckpt.check_same_config(saved, FedsiteConfig(module_selection="kill-revive"), tmp_path / "checkpoint.npz")
    with pytest.raises(ckpt.CheckpointError, match=r"kr-assign='shared' but this run has kr-assign='per-client'"):
        ckpt.check_same_config(saved, FedsiteConfig(module_selection="kill-revive", kr_assign="per-client"), tmp_path / "checkpoint.npz")


def test_a_field_without_effect_in_both_runs_may_differ_on_resume(tmp_path):
    """selection-fairness-weight's default went from 0 to 1.5: a uniform run written before still resumes."""
    path = tmp_path / "checkpoint.npz"
    for selection in ("uniform", "energy-aware"):
        saved = ckpt.Checkpoint(1, {}, meta={"config": {**FedsiteConfig(client_selection=selection).to_flat(), "selection-fairness-weight": 0.0}})
        if selection == "uniform":
            ckpt.check_same_config(saved, FedsiteConfig(), path)
        else:  # there it changes who trains: refused, naming the field
            with pytest.raises(ckpt.CheckpointError, match=r"selection-fairness-weight=0.0 but this run has selection-fairness-weight=1.5"):
                ckpt.check_same_config(saved, FedsiteConfig(client_selection=selection), path)
    all_modules = ckpt.Checkpoint(1, {}, meta={"config": {**FedsiteConfig().to_flat(), "kr-active-share": 0.25}})
    ckpt.check_same_config(all_modules, FedsiteConfig(), path)  # kr-* knobs do nothing with module-selection 'all'
    with pytest.raises(ckpt.CheckpointError, match="kr-active-share=0.25 but this run has kr-active-share=0.5"):
        ckpt.check_same_config(all_modules, FedsiteConfig(module_selection="kill-revive"), path)
