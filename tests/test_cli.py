"""The `fedsite` front door: every option is described; bad input is a one-line error."""

import argparse
import json
import re
import subprocess
import sys

import pytest

from aggregation.rules import RULES
from fedsite.cli import build_parser, main
from fedsite.options import FIELD_HELP, GROUPS
from finetune.choices import CHOICES
from finetune.config import field_help, field_key, field_names
from simulations.experiment import load_experiment


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


def run_fedsite(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsite", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("argv", [["--help"], ["simulate", "--help"], ["coordinator", "--help"], ["client", "--help"], ["emulator", "build", "--help"], ["sweep", "--help"]])
def test_help_prints_no_warning_and_loads_no_torch_or_flower(argv):
    proc = run_fedsite(*argv)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "usage: fedsite" in proc.stdout and "warn" not in proc.stdout.lower() and "Failed to load" not in proc.stdout
    check = "import sys; from fedsite.cli import main\ntry: main(%r)\nexcept SystemExit: pass\nprint(sorted({'torch', 'flwr', 'transformers', 'bitsandbytes', 'ray'} & set(sys.modules)))" % argv
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1]
    assert loaded == "[]", f"{argv} imports {loaded}"


def test_a_missing_data_file_fails_in_one_line_naming_data_and_writes_no_results(tmp_path):
    """The contract: `fedsite simulate --data missing.jsonl --model tiny --out DIR`."""
    proc = run_fedsite("simulate", "--data", "missing.jsonl", "--model", "tiny", "--out", str(tmp_path / "DIR"), cwd=tmp_path)
    assert proc.returncode != 0
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "--data" in lines[0] and "missing.jsonl" in lines[0], lines
    assert not (tmp_path / "DIR").exists()


def test_errors_name_the_option_as_typed(tmp_path, capsys):
    for argv, expected in [(["--rounds", "-1"], "--rounds = -1 must be at least 1"), (["--num-server-rounds", "0"], "--num-server-rounds = 0 must be at least 1"),
                           (["--clients", "two"], "--clients = 'two' is not a valid int"), (["--secure", "--aggregation", "median"], "--aggregation = 'median' must be")]:
        assert main(["simulate", "--model", "tiny", "--out", str(tmp_path / "r"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0] and "num-server-rounds" not in err[0].replace(expected, ""), err
    experiment = tmp_path / "e.toml"
    experiment.write_text('model = "tiny"\nrounds = 0\n')
    assert main(["simulate", "--config", str(experiment), "--out", str(tmp_path / "r")]) == 2
    assert "'rounds' = 0 must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv", [["simulate"], ["report", "x", "--out", "y"], ["emulator", "build", "--out", "y"], ["coordinator"], ["sweep", "e.toml", "--out", "y"]])
def test_an_unknown_option_is_shown_under_the_subcommands_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    command = " ".join(arg for arg in argv[:2] if arg in ("simulate", "report", "emulator", "build", "coordinator", "sweep"))
    assert err.startswith(f"usage: fedsite {command} ") and f"fedsite {command}: error: unrecognized arguments: --bogus" in err, err


def test_every_cli_option_is_a_toml_key_and_old_names_still_work(tmp_path):
    parser = build_parser()
    simulate = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["simulate"]
    options = {s[2:] for a in simulate._actions for s in a.option_strings if a.dest in field_help()}
    assert options == {name for names in field_names().values() for name in names} and "rounds" in options
    for option in options:
        key = field_key(option)
        default = field_help()[key][0]
        experiment = tmp_path / f"{option}.toml"
        value = 2 if key == "num-server-rounds" else default
        experiment.write_text(f"{option} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}\n")
        assert load_experiment(experiment).config.to_flat()[key] == value, option


def test_help_groups_the_options_and_lists_every_accepted_value(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--help"])
    text = capsys.readouterr().out
    headings = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings[1:] == [*GROUPS], headings  # after "options:" (-h)
    assert "other options" not in text
    flat = " ".join(text[text.index("\noptions:"):].split()).replace("- ", "-")  # argparse wraps inside words like trimmed-mean
    for key, values in [*CHOICES.items(), ("aggregation", tuple(RULES))]:
        entry = flat[flat.index(f"--{key} "):][:600]
        assert all(value in entry for value in values), (key, values)
    assert "fedex-lora" in flat and "flora" in flat
    entries = {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in re.split(r"\n(?=  -)", text[text.index("\nmodel and LoRA:"):])}
    for key in field_help():
        assert entries[f"--{key}" if key != "num-server-rounds" else "--rounds"].count("default") == 1, key


def test_emulator_build_with_low_rank_distillation_verifies(tmp_path, capsys):
    package = tmp_path / "pkg"
    assert main(["emulator", "build", "--model", "tiny", "--out", str(package), "--distill-steps", "3", "--distill-rank", "2"]) == 0
    assert "distilled True" in capsys.readouterr().out
    assert main(["emulator", "verify", str(package)]) == 0
