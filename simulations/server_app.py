"""The Flower app's ServerApp: `flwr run .`, and the app `fedsite coordinator` submits.

The coordinator's federation (`coordinator.server_app.run_federation`) with the run's population
model, which only simulations have: an experiment file's `[population]` and `[[profiles]]`, or
the `emulator-share` of clients that may not hold the backbone. The coordinator itself imports
nothing from simulations/; the population is handed to it here and by `simulations.runner`.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.server_app import run_federation
from finetune.config import from_mapping
from finetune.logs import setup_logging
from simulations.experiment import population_for

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The run config comes from pyproject.toml (and `--run-config` overrides)."""
    setup_logging()
    config = from_mapping(context.run_config)
    run_federation(grid, config, population_for(config))
