"""Client state that outlives a round without living in memory: the error-feedback residual and
the local-DP accountant.

Flower keeps every node's `context.state` in memory for the whole run (in a simulation, all of
them in the coordinator's process), so an adapter-sized residual per client makes memory grow
with the number of clients. The residual goes to the client's own disk instead, one
safetensors file per run and client, written atomically.

Where: the node config's `state-dir` (set by `fedsite client`), else FEDSITE_CLIENT_STATE (a
simulation sets it to a folder of its own and removes it after the run), else the system's
temp folder; below it `run-<run id>/<client>-<name>.safetensors`, so a new run never picks up
an old residual.

The local-DP accountant (`load_ledger` / `save_ledger`) is JSON. A deployed device keeps one
ledger for its data across runs and restarts (node config `privacy-ledger`, set by `fedsite
client`): the privacy its data has lost does not reset with a new run. A simulated client keeps
it per run beside its residual. Every file is written atomically and owner-only (0600).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Context
from safetensors.numpy import load_file, save_file

from client.privacy_policy import LEDGER_KEY


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
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = _private_temp(path)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    os.replace(tmp, path)
    return path


def ledger_path(context: Context) -> Path:
    explicit = context.node_config.get(LEDGER_KEY)
    if explicit:
        return Path(str(explicit)).expanduser()
    return state_path(context, "privacy").with_suffix(".json")


def load_ledger(context: Context) -> dict | None:
    """The accountant state saved for this client (None before its first DP round).

    A ledger that exists but cannot be read is an error, never a fresh start: forgetting spent
    privacy is the one failure a device must not have.
    """
    path = ledger_path(context)
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LedgerError(f"privacy ledger {path} cannot be read ({type(err).__name__}: {err}); refusing to train as if nothing had been spent") from err
    if not isinstance(state, dict) or not isinstance(state.get("history", []), list):
        raise LedgerError(f"privacy ledger {path} is not an accountant state; refusing to train as if nothing had been spent")
    return state


def save_ledger(context: Context, state: Mapping) -> Path:
    """Write the accountant state atomically and durably (fsync before the rename)."""
    path = ledger_path(context)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = _private_temp(path)
    with open(tmp, "w") as f:
        json.dump(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class LedgerError(RuntimeError):
    """The device's privacy ledger exists but is unreadable."""


def _private_temp(path: Path) -> Path:
    """A new temp file beside `path`, created owner-only (0600) and never through a symlink."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.close(fd)
    return tmp
