"""Run a federation in-process on Flower's simulation engine (Ray backend).

One Ray actor per worker holds one backbone; simulated clients are scheduled onto the
workers and swap their LoRA arrays in, so memory grows with workers, not with clients. A worker
with a GPU share (`gpus-per-worker`) keeps its backbone on that GPU. With `ray-address` (or
$RAY_ADDRESS) the workers run on the nodes of a running Ray cluster instead of a private Ray.
"""

from __future__ import annotations

import logging
import math
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
from simulations.console import run_console
from simulations.experiment import population_for
from simulations.preflight import preflight
from finetune.config import FedsiteConfig

log = logging.getLogger("fedsite")


class SimulationError(RuntimeError):
    """The simulation engine failed; Flower's server thread may still be blocked on replies."""


def ray_address(config: FedsiteConfig) -> str:
    """The Ray cluster to join: `ray-address`, else $RAY_ADDRESS; "" = a private Ray on this machine."""
    return config.ray_address or os.environ.get("RAY_ADDRESS", "").strip()


def gpus_per_worker(config: FedsiteConfig, gpus: int) -> float:
    """Each worker's GPU share: `gpus-per-worker`, or with 0 (auto) on a CUDA device the `gpus`
    visible GPUs shared equally by the workers (at most one each); none otherwise. Ray hides
    the GPUs from a worker without a share, so a CUDA device needs one."""
    if config.gpus_per_worker > 0:
        return config.gpus_per_worker
    if not gpus or ray_address(config):
        return 0.0
    return min(1.0, math.floor(gpus / config.workers * 10_000) / 10_000)  # Ray counts resource shares in 1e-4 steps


def backend_config(config: FedsiteConfig, gpus: int = 0) -> dict:
    """Flower's Ray backend: one worker process per concurrent client, each `num_cpus` 1 and its
    GPU share (`gpus_per_worker`). A private Ray gets `workers` CPUs and this machine's `gpus`; on
    a running cluster (`ray_address`) Ray is joined as it is (its nodes bring their own CPUs and
    GPUs, and `ray.init` refuses resource counts there), so the cluster's size sets how many
    clients run at once."""
    resources = {"num_cpus": 1, "num_gpus": gpus_per_worker(config, gpus)}
    address = ray_address(config)
    if address:
        return {"client_resources": resources, "init_args": {"address": address}}
    init_args: dict = {"num_cpus": config.workers, "include_dashboard": False}
    if resources["num_gpus"] > 0:
        init_args["num_gpus"] = gpus
    return {"client_resources": resources, "init_args": init_args}


def check_placement(config: FedsiteConfig) -> int:
    """Fail before Ray starts, in one line, on a device or GPU share this run cannot have; return
    the number of CUDA GPUs this machine shows. The coordinator evaluates here, on `device`;
    a private Ray's workers share this machine's GPUs."""
    from finetune.device import DeviceError, placement

    if ray_address(config) and config.device.startswith("cuda") and config.gpus_per_worker == 0:
        raise DeviceError(f"device '{config.device}' on a Ray cluster needs gpus-per-worker > 0 (Ray hides the GPUs from workers without a share)")
    device, _ = placement(config.device, config.dtype)  # DeviceError names the device
    gpus = torch_cuda_count() if device.type == "cuda" or config.gpus_per_worker > 0 else 0
    if config.gpus_per_worker > 0 and not gpus and not ray_address(config):
        raise DeviceError(f"gpus-per-worker {config.gpus_per_worker:g} needs a CUDA GPU, and this machine has none (run on a Ray cluster with GPUs via --ray-address, or set gpus-per-worker 0)")
    if config.gpus_per_worker > 1 and not float(config.gpus_per_worker).is_integer():
        raise DeviceError(f"gpus-per-worker {config.gpus_per_worker:g} must be a share in (0, 1] or a whole number of GPUs")
    return gpus


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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
    preflight(config)  # values, data, model, packages: one line, before anything is written
    gpus = check_placement(config)  # an unavailable device or GPU share: one line, before Ray starts
    if not config.secure:
        load_checkpoint(config)  # an unusable checkpoint fails here, in one line, not inside Flower's server thread
    out = Path(config.out)
    address = ray_address(config)
    log.info("[fedsite] simulating %d clients for %d rounds on '%s' -> %s (config: %s, logs: %s/)%s", config.clients, config.num_server_rounds, config.model, out,
             out / "config.toml", out / "logs", f" (Ray cluster at {address})" if address else "")
    if config.model == "tiny":
        log.info("[fedsite] model 'tiny' is a plumbing check: random weights, so accuracy stays 0.000 (expected); the default smollm2 learns")
    share_threads(config.workers)
    engine = backend_config(config, gpus)
    engine["init_args"]["log_to_driver"] = verbose  # workers log to OUT/logs/worker-PID.log; on the console only with --verbose
    try:
        with client_state_dir(), run_console(out, verbose):
            run_simulation(
                server_app=make_server_app(config, population_for(config)),
                client_app=client or (secure_client_app if config.secure else client_app),
                num_supernodes=config.clients,
                backend_config=engine,
                verbose_logging=verbose,
            )
    except RuntimeError as err:
        cause = err.__cause__ or err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise SimulationError(f"simulation failed: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from err
    if not (out / "metrics.jsonl").is_file() or not (out / "adapter" / "adapter_model.safetensors").is_file():
        raise RuntimeError(f"simulation ended without results in {out}; see {out / 'logs'}/")
    return out
