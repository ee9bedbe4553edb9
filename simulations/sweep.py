"""Sweeps: every combination of an experiment's [sweep] grid, once per seed, one folder per run.

Each run is a separate `fedsite simulate` process (a crashed or killed run cannot take the
sweep's memory or Ray session with it) reading the run's own `run.toml`. A run whose folder
already holds `summary.json` (written last) is finished and skipped, so re-running the same
command resumes a sweep.
"""

from __future__ import annotations

import itertools
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from finetune.config import ConfigError, FedsiteConfig, from_mapping
from simulations.experiment import Experiment, load_experiment

log = logging.getLogger("fedsite")

DONE_FILE = "summary.json"


@dataclass(frozen=True)
class PlannedRun:
    name: str
    config: FedsiteConfig

    @property
    def folder(self) -> Path:
        return Path(self.config.out)

    def finished(self) -> bool:
        return (self.folder / DONE_FILE).is_file()


def _label(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value).lower()).strip("-") or "x"


def plan_sweep(experiment: Experiment, out: str | Path) -> list[PlannedRun]:
    """The runs of `experiment`'s sweep (just the experiment itself when it has none), under `out`."""
    sweep = experiment.sweep
    grid = sweep.grid if sweep else {}
    seeds = sweep.seeds if sweep else [experiment.config.seed]
    keys = list(grid)
    runs = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        for seed in seeds:
            name = "_".join([*(f"{k}-{_label(v)}" for k, v in zip(keys, combo)), f"seed-{seed}"])
            values = dict(zip(keys, combo), seed=seed, out=str(Path(out) / name))
            runs.append(PlannedRun(name, from_mapping(values, experiment.config)))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError("sweep: two runs map to the same folder name; make the swept values distinct")
    return runs


def simulate_in_subprocess(run: PlannedRun) -> int:
    """Run one planned run as `python -m fedsite simulate --config RUN/run.toml`; its exit code."""
    run.folder.mkdir(parents=True, exist_ok=True)
    config_file = run.folder / "run.toml"
    config_file.write_text(tomli_w.dumps(run.config.to_flat()))
    return subprocess.run([sys.executable, "-m", "fedsite", "simulate", "--config", str(config_file)]).returncode


def run_sweep(path: str | Path, out: str | Path, runner: Callable[[PlannedRun], int] = simulate_in_subprocess, dry_run: bool = False) -> list[tuple[PlannedRun, str]]:
    """Run every unfinished run of the experiment at `path`; (run, 'done'|'skipped'|'failed (rc)'|'planned')."""
    runs = plan_sweep(load_experiment(path), out)
    Path(out).mkdir(parents=True, exist_ok=True)
    outcome = []
    for i, run in enumerate(runs, start=1):
        if run.finished():
            status = "skipped"
        elif dry_run:
            status = "planned"
        else:
            log.info("[fedsite] sweep run %d/%d: %s", i, len(runs), run.name)
            rc = runner(run)
            status = "done" if rc == 0 and run.finished() else f"failed ({rc})"
        log.info("[fedsite] sweep run %d/%d %s: %s", i, len(runs), status, run.folder)
        outcome.append((run, status))
    return outcome
