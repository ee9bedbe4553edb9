"""The `fedsite` front door: every option is described; bad input is a one-line error."""

import pytest

from fedsite.cli import build_parser, main
from fedsite.options import FIELD_HELP
from finetune.config import field_help


def test_every_config_field_has_help_text():
    assert set(field_help()) <= set(FIELD_HELP), sorted(set(field_help()) - set(FIELD_HELP))


@pytest.mark.parametrize("argv", [["--help"], ["simulate", "--help"], ["emulator", "--help"], ["emulator", "build", "--help"], ["emulator", "verify", "--help"], ["report", "--help"]])
def test_help_exits_cleanly(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 0
    assert "usage: fedsite" in capsys.readouterr().out


def test_simulate_help_lists_contract_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--clients", "--rounds", "--out", "--data", "--partitioning", "--aggregation", "--upload-codec", "--config"):
        assert option in text


def test_bad_values_are_one_line_errors(tmp_path, capsys):
    assert main(["simulate", "--model", "tiny", "--lr", "fast", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lr" in err[0]
    assert main(["simulate", "--aggregation", "fedmagic", "--out", str(tmp_path)]) == 2
    assert "aggregation" in capsys.readouterr().err
    assert main(["simulate", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_report_of_a_missing_folder_is_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err.strip().splitlines()[-1]


def test_emulator_build_and_verify(tmp_path, capsys):
    package = tmp_path / "pkg"
    assert main(["emulator", "build", "--model", "tiny", "--out", str(package)]) == 0
    assert "emulator" in capsys.readouterr().out
    assert main(["emulator", "verify", str(package)]) == 0
    weights = package / "emulator.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["emulator", "verify", str(package)]) != 0
    assert "emulator.safetensors" in capsys.readouterr().err.strip().splitlines()[-1]
