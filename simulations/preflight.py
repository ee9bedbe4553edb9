"""Checks a run's inputs before Flower or Ray start, so a mistake costs seconds, not a Ray start.

Each failure is one `PreflightError` line naming the option as the user wrote it (`labels`:
field key -> "--data", else `--KEY`), and nothing is written: the results folder is made only
once every check has passed. Light imports only; `fedsite simulate` calls this before it loads
torch or Flower, and `simulations.runner.simulate` again for callers that skip the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from finetune.config import ConfigError, FedsiteConfig

BUILTIN_MODELS = ("smollm2", "tiny")
EMULATOR_MANIFEST = "manifest.pb"  # emulator/package.py's MANIFEST (that module loads torch)


class PreflightError(ConfigError):
    """A run input that cannot work; the message names the option."""


def option(key: str, labels: Mapping[str, str] | None) -> str:
    return (labels or {}).get(key) or f"--{key}"


def check_examples(key: str, spec: str, labels: Mapping[str, str] | None) -> None:
    """A .jsonl file or datasets folder is read whole now: a bad line fails with its number."""
    from finetune.userdata import DataError, load_examples

    try:
        load_examples(spec)
    except (DataError, OSError) as err:
        raise PreflightError(f"{option(key, labels)}: {str(err).removeprefix('data: ')}") from None


def check_model(spec: str, labels: Mapping[str, str] | None) -> None:
    if spec in BUILTIN_MODELS:
        return
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise PreflightError(f"{option('model', labels)} '{spec}': no such folder (expected {', '.join(BUILTIN_MODELS)} or a Hugging Face model folder)")
    if not (folder / "config.json").is_file():
        raise PreflightError(f"{option('model', labels)} '{spec}': no config.json inside; expected a Hugging Face model folder")


def check_emulator_package(spec: str, labels: Mapping[str, str] | None) -> None:
    folder = Path(spec).expanduser()
    if not (folder / EMULATOR_MANIFEST).is_file():
        what = "no such folder" if not folder.is_dir() else f"no {EMULATOR_MANIFEST} inside"
        raise PreflightError(f"{option('emulator-package', labels)} '{spec}': {what} (build one with `fedsite emulator build`)")


def check_experiment(spec: str, labels: Mapping[str, str] | None) -> None:
    from simulations.experiment import resolve

    if not resolve(spec).is_file():
        raise PreflightError(f"{option('experiment', labels)} '{spec}': file not found")


def check_out(spec: str, labels: Mapping[str, str] | None) -> None:
    out = Path(spec).expanduser()
    if out.exists() and not out.is_dir():
        raise PreflightError(f"{option('out', labels)} '{spec}' is a file, not a folder")


def preflight(config: FedsiteConfig, labels: Mapping[str, str] | None = None) -> FedsiteConfig:
    """Every input `config` names, checked in the order a user would fix them; returns `config`."""
    config.validate(labels)  # values and option combinations
    check_out(config.out, labels)
    check_model(config.model, labels)
    if config.data != "builtin":
        check_examples("data", config.data, labels)
    if config.emulator_distill_data:
        check_examples("emulator-distill-data", config.emulator_distill_data, labels)
    if config.emulator_package:
        check_emulator_package(config.emulator_package, labels)
    if config.experiment:
        check_experiment(config.experiment, labels)
    return config
