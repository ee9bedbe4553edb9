"""Bad inputs fail in one line naming the option, before Flower or Ray start and before OUT exists."""

from __future__ import annotations

import pytest

from finetune.config import FedsiteConfig
from simulations import runner
from simulations.preflight import PreflightError, preflight


@pytest.fixture()
def no_engine(monkeypatch):
    """Any start of Flower's simulation engine (and so of Ray) fails the test."""
    def started(**_):
        raise AssertionError("the simulation engine was started")

    monkeypatch.setattr(runner, "run_simulation", started)


def bad_inputs(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"instruction": "a", "output": "b"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", output}\n')
    no_output = tmp_path / "no_output.jsonl"
    no_output.write_text('{"instruction": "a"}\n')
    model = tmp_path / "model"
    model.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        ({"data": str(tmp_path / "missing.jsonl")}, r"^--data: .*missing.jsonl: file not found"),
        ({"data": str(bad)}, r"^--data: .*bad.jsonl:3: invalid JSON"),
        ({"data": str(no_output)}, r"^--data: .*no_output.jsonl:1: missing field 'output'"),
        ({"data": "train.csv"}, r"^--data: 'train.csv' is not usable"),
        ({"model": str(tmp_path / "nope")}, r"^--model '.*nope': no such folder"),
        ({"model": str(model)}, r"^--model '.*model': no config.json inside"),
        ({"emulator_package": str(model)}, r"^--emulator-package '.*model': no manifest.pb inside"),
        ({"emulator_distill_data": str(tmp_path / "d.jsonl")}, r"^--emulator-distill-data: .*d.jsonl: file not found"),
        ({"experiment": str(tmp_path / "e.toml")}, r"^--experiment '.*e.toml': file not found"),
        ({"out": str(a_file), "data": str(good)}, r"^--out '.*a_file' is a file"),
    ]


def test_each_bad_input_fails_before_the_engine_starts_and_writes_nothing(tmp_path, no_engine):
    for fields, message in bad_inputs(tmp_path):
        out = fields.pop("out", str(tmp_path / "results"))
        config = FedsiteConfig(model=fields.pop("model", "tiny"), out=out).replace(**fields)
        with pytest.raises(PreflightError, match=message):
            runner.simulate(config)
        assert not (tmp_path / "results").exists(), fields


def test_option_combinations_are_checked_with_the_option_as_typed(tmp_path, no_engine):
    config = FedsiteConfig(model="tiny", out=str(tmp_path / "results"))
    with pytest.raises(PreflightError):
        preflight(config.replace(model=str(tmp_path / "nope")), {"model": "--model"})
    with pytest.raises(ValueError, match=r"^--rounds = 0 must be at least 1"):
        preflight(config.replace(num_server_rounds=0), {"num-server-rounds": "--rounds"})
    with pytest.raises(ValueError, match=r"^--aggregation = 'median' must be a rule that needs only the sum"):
        preflight(config.replace(secure=True, aggregation="median"), {"aggregation": "--aggregation"})
    with pytest.raises(ValueError, match=r"^config field 'quantize' = 'nf4' must be none with aggregation 'flora'"):
        runner.simulate(config.replace(quantize="nf4", aggregation="flora"))  # without labels: the field's name
    assert not (tmp_path / "results").exists()


def test_good_inputs_pass(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    config = FedsiteConfig(model="tiny", data=str(data), out=str(tmp_path / "results"))
    assert preflight(config) is config
    assert not (tmp_path / "results").exists()
