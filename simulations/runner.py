"""Run a federation in-process on Flower's simulation engine (Ray backend).

One Ray actor per worker holds one backbone; simulated clients are scheduled onto the
workers and swap their LoRA arrays in, so memory grows with workers, not with clients.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from client.client_app import app as client_app
from client.secure import app as secure_client_app
from client.state import STATE_ENV
from coordinator.checkpoint import load_checkpoint
from coordinator.server_app import make_server_app
from simulations.experiment import population_for
from finetune.config import FedsiteConfig

log = logging.getLogger("fedsite")


class SimulationError(RuntimeError):
    """The simulation engine failed; Flower's server thread may still be blocked on replies."""


def backend_config(config: FedsiteConfig) -> dict:
    """Ray resources: `workers` concurrent clients (one worker process each)."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": config.workers, "include_dashboard": False},
    }


def share_threads(workers: int) -> None:
    """Give each worker an equal share of the cores; Ray's workers inherit this environment."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = threads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextmanager
def client_state_dir() -> Iterator[Path | None]:
    """Simulated clients keep their error-feedback residuals (`client.state`) in a folder of this
    run only, removed afterwards: one file per client per run would otherwise pile up in the temp
    folder over sweeps. A folder the user named in FEDSITE_CLIENT_STATE is kept as it is."""
    if os.environ.get(STATE_ENV):
        yield None
        return
    path = Path(tempfile.mkdtemp(prefix="fedsite-client-state-"))
    os.environ[STATE_ENV] = str(path)  # Ray's workers inherit it, like the thread settings
    try:
        yield path
    finally:
        os.environ.pop(STATE_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def simulate(config: FedsiteConfig, verbose: bool = False, client: ClientApp | None = None) -> Path:
    """Run `config.clients` simulated clients for `config.num_server_rounds` rounds; return the results folder.

    `client` replaces the ClientApp (default: the plain app, or with `secure` the SecAgg+ one).
    """
    config.validate()  # names an unknown aggregation rule, among others
    if not config.secure:
        load_checkpoint(config)  # an unusable checkpoint fails here, in one line, not inside Flower's server thread
    out = Path(config.out)
    log.info("[fedsite] simulating %d clients for %d rounds on '%s' -> %s", config.clients, config.num_server_rounds, config.model, out)
    share_threads(config.workers)
    try:
        with client_state_dir():
            run_simulation(
                server_app=make_server_app(config, population_for(config)),
                client_app=client or (secure_client_app if config.secure else client_app),
                num_supernodes=config.clients,
                backend_config=backend_config(config),
                verbose_logging=verbose,
            )
    except RuntimeError as err:
        cause = err.__cause__ or err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise SimulationError(f"simulation failed: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from err
    if not (out / "metrics.jsonl").is_file() or not (out / "adapter" / "adapter_model.safetensors").is_file():
        raise RuntimeError(f"simulation ended without results in {out}; see the log above")
    return out
