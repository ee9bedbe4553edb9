"""The coordinator's state after each completed round, written atomically; resume from it.

One file, `OUT/checkpoint.npz`, holds everything a restarted coordinator needs to continue as
if it had never stopped: the global adapter, the server optimizer's moments, the round number,
the client-level DP accountant (clip bound, rounds, noise RNG), the sampling RNGs, and the
results recorded so far (initial evaluation, per-round rows, and the length of every JSONL
file in the results folder). It is written to a temporary file and renamed with `os.replace`,
so a kill at any point leaves either the previous or the new checkpoint, never half of one.

On resume every JSONL file is cut back to its length at the checkpoint: lines a killed round
wrote after it (a metrics row, client lines) are dropped and that round runs again, so no round
is counted twice. A finished run removes its checkpoint, so running the same command again
starts afresh; an interrupted one resumes. A checkpoint of a different configuration is an
error naming the first field that differs.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregation import server_opt
from coordinator.aggregate import Aggregator
from coordinator.client_dp import ClientLevelDP
from coordinator.results import RunRecorder
from finetune.config import ConfigError, FedsiteConfig

log = logging.getLogger("fedsite.coordinator")

CHECKPOINT = "checkpoint.npz"
# Fields that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = frozenset({"out", "workers", "round-timeout", "num-server-rounds"})
VERSION = 1


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed (other configuration, unreadable file)."""


@dataclass
class Checkpoint:
    """The state after round `round` (0 = nothing trained yet)."""

    round: int
    arrays: dict[str, np.ndarray]
    server_opt: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def checkpoint_path(out: str | Path) -> Path:
    return Path(out) / CHECKPOINT


def _jsonl_sizes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(out.glob("*.jsonl"))}


def _rng_state() -> dict[str, Any]:
    """Python's and NumPy's global RNGs (Flower samples clients with `random`)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    recorder: RunRecorder,
    server_round: int,
    arrays: dict[str, np.ndarray],
    aggregator: Aggregator | None = None,
    client_dp: ClientLevelDP | None = None,
    strategy_state: dict[str, Any] | None = None,
) -> Path:
    """Atomically write the state after `server_round` into the recorder's results folder.

    `strategy_state` is the strategy's own JSON-able state (`FedsiteStrategy.state_dict`), read
    back from `Checkpoint.meta["strategy"]`."""
    out = recorder.out
    meta = {
        "version": VERSION,
        "round": server_round,
        "config": recorder.config.to_flat(),
        "recorder": {"initial": recorder.initial, "rounds": recorder.rounds, "jsonl": _jsonl_sizes(out)},
        "client_dp": client_dp.state_dict() if client_dp is not None else None,
        "strategy": strategy_state,
        "rng": _rng_state(),
    }
    payload = {f"global/{k}": np.asarray(v) for k, v in arrays.items()}
    if aggregator is not None and aggregator.state is not None:
        payload.update({f"opt/{k}": v for k, v in server_opt.state_to_arrays(aggregator.state).items()})
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = checkpoint_path(out)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_checkpoint(out: str | Path) -> Checkpoint | None:
    """The checkpoint in `out`, or None if there is none."""
    path = checkpoint_path(out)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            arrays = {k[len("global/") :]: data[k] for k in data.files if k.startswith("global/")}
            opt = {k[len("opt/") :]: data[k] for k in data.files if k.startswith("opt/")}
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({err}); delete it to start the run afresh") from None
    return Checkpoint(int(meta["round"]), arrays, opt, meta)


def check_same_config(checkpoint: Checkpoint, config: FedsiteConfig, path: Path) -> None:
    """Raise a one-line CheckpointError naming the first field that differs."""
    saved, now = checkpoint.meta["config"], config.to_flat()
    for key in sorted(set(saved) | set(now)):
        if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key):
            raise CheckpointError(
                f"checkpoint '{path}' was written with {key}={saved.get(key)!r} but this run has {key}={now.get(key)!r}; "
                "use another --out or delete the checkpoint to start afresh"
            )
    if checkpoint.round > config.num_server_rounds:
        raise CheckpointError(f"checkpoint '{path}' is at round {checkpoint.round}, past num-server-rounds={config.num_server_rounds}")


def load_checkpoint(config: FedsiteConfig) -> Checkpoint | None:
    """The resumable checkpoint in the run's results folder, if any (checked against `config`)."""
    checkpoint = read_checkpoint(config.out)
    if checkpoint is not None:
        check_same_config(checkpoint, config, checkpoint_path(config.out))
    return checkpoint


def restore(checkpoint: Checkpoint, recorder: RunRecorder, aggregator: Aggregator | None = None, client_dp: ClientLevelDP | None = None) -> None:
    """Put the checkpoint's state back into the run's objects and cut the JSONL files back."""
    saved = checkpoint.meta["recorder"]
    for path in recorder.out.glob("*.jsonl"):
        size = saved["jsonl"].get(path.name, 0)
        if path.stat().st_size > size:
            with path.open("r+b") as f:
                f.truncate(size)
    recorder.initial, recorder.rounds = saved["initial"], list(saved["rounds"])
    if aggregator is not None and checkpoint.server_opt:
        aggregator.state = server_opt.state_from_arrays(checkpoint.server_opt)
    if client_dp is not None and checkpoint.meta.get("client_dp"):
        client_dp.load_state_dict(checkpoint.meta["client_dp"])
    _set_rng_state(checkpoint.meta["rng"])
    log.info("[fedsite] resuming from the checkpoint after round %d in %s", checkpoint.round, recorder.out)


def remove_checkpoint(out: str | Path) -> None:
    """A finished run needs no checkpoint: the next run in this folder starts afresh."""
    checkpoint_path(out).unlink(missing_ok=True)
