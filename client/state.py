"""Client state that outlives a round without living in memory: the error-feedback residual.

Flower keeps every node's `context.state` in memory for the whole run (in a simulation, all of
them in the coordinator's process), so an adapter-sized residual per client makes memory grow
with the number of clients. The residual goes to the client's own disk instead, one
safetensors file per run and client, written atomically.

Where: the node config's `state-dir` (set by `fedsite client`), else FEDSITE_CLIENT_STATE (a
simulation sets it to a folder of its own and removes it after the run), else the system's
temp folder; below it `run-<run id>/<client>-<name>.safetensors`, so a new run never picks up
an old residual.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Context
from safetensors.numpy import load_file, save_file


STATE_ENV = "FEDSITE_CLIENT_STATE"  # a simulation points it at a folder of its own (simulations.runner)


def state_root(context: Context) -> Path:
    explicit = context.node_config.get("state-dir") or os.environ.get(STATE_ENV)
    return Path(str(explicit)).expanduser() if explicit else Path(tempfile.gettempdir()) / "fedsite-client-state"


def state_path(context: Context, name: str) -> Path:
    client = context.node_config.get("partition-id", context.node_id)
    return state_root(context) / f"run-{context.run_id}" / f"{client}-{name}.safetensors"


def load_state(context: Context, name: str) -> dict[str, np.ndarray] | None:
    """The arrays saved under `name` for this client and run, or None before the first save."""
    path = state_path(context, name)
    return load_file(str(path)) if path.exists() else None


def save_state(context: Context, name: str, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write atomically (temp file + rename): a client killed mid-write keeps the last state."""
    path = state_path(context, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    os.replace(tmp, path)
    return path
