"""The coordinator's state after each completed round, written atomically; resume from it.

One file, `OUT/checkpoint.npz`, holds everything a restarted coordinator needs to continue as
if it had never stopped: the global adapter, the server optimizer's moments, the round number,
the client-level DP accountant (clip bound, rounds), the sampling RNGs, the strategy's own
state (`strategy` in the meta; its arrays, such as the offsite track's emulator refresh and
moments, under `state/`), and the results recorded so far (initial evaluation, per-round rows, and the length of every JSONL file in the
results folder). It is written owner-only (0600) to a temporary file and renamed with
`os.replace` (`coordinator.files.write_atomic`), so a kill at any point leaves either the
previous or the new checkpoint, never half of one. DP noise comes from the OS CSPRNG and has no
state here: a checkpoint cannot replay it (an older checkpoint's `client_dp.rng` is ignored).

Reading never unpickles, and checks the whole file before anything is done with it: a
truncated, corrupted or foreign file, a newer `VERSION` or a wrong type inside is a one-line
`CheckpointError` naming the file and the problem, raised before any results file is touched.

On resume every JSONL file is cut back to its length at the checkpoint: lines a killed round
wrote after it (a metrics row, client lines) are dropped and that round runs again, so no round
is counted twice. A finished run removes its checkpoint, so running the same command again
starts afresh; an interrupted one resumes. A checkpoint of a different configuration is an
error naming the first field that differs.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from aggregation import server_opt
from aggregation.partial import under
from coordinator.aggregate import Aggregator
from coordinator.client_dp import ClientLevelDP
from coordinator.files import write_atomic
from coordinator.results import RunRecorder
from finetune.config import ConfigError, FedsiteConfig

log = logging.getLogger("fedsite.coordinator")

CHECKPOINT = "checkpoint.npz"
# Fields that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = frozenset({"out", "workers", "round-timeout", "num-server-rounds"})
VERSION = 2  # the newest format this Fedsite reads (and the one it writes); 2 added the `state/` members
# The strategy's arrays (`FedsiteStrategy.state_arrays`): the offsite track's emulator refresh and server-optimizer moments.
STATE_REFRESH, STATE_OPT = "state/offsite/refresh/", "state/offsite/opt/"
# A field with no effect in both runs may differ (its default changed, say): gate field -> the value that disables it.
_GATES = {"client-selection": "uniform", "module-selection": "all"}
_GATED = {"selection-": "client-selection", "kr-": "module-selection"}
# Errors a damaged zip or npy member can raise while it is read.
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, zlib.error, NotImplementedError)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed (other configuration, unreadable file)."""


class _Invalid(Exception):
    """What is wrong with a checkpoint file; `read_checkpoint` adds the path and what to do."""

    def __init__(self, problem: str, newer: bool = False) -> None:
        super().__init__(problem)
        self.newer = newer


@dataclass
class Checkpoint:
    """The state after round `round` (0 = nothing trained yet)."""

    round: int
    arrays: dict[str, np.ndarray]
    server_opt: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    state_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the strategy's own (`FedsiteStrategy.state_arrays`)


def checkpoint_path(out: str | Path) -> Path:
    return Path(out) / CHECKPOINT


def _jsonl_sizes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(out.glob("*.jsonl"))}


def _rng_state() -> dict[str, Any]:
    """Python's and NumPy's global RNGs (Flower samples clients with `random`)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss], "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(state: dict[str, Any], python: Any = random, numpy: Any = np.random) -> None:
    """Set the global RNGs (or the given `random.Random` and `np.random.RandomState`) to `state`."""
    version, internal, gauss = state["python"]
    python.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    numpy.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    recorder: RunRecorder,
    server_round: int,
    arrays: dict[str, np.ndarray],
    aggregator: Aggregator | None = None,
    client_dp: ClientLevelDP | None = None,
    strategy_state: dict[str, Any] | None = None,
    state_arrays: dict[str, np.ndarray] | None = None,
) -> Path:
    """Atomically write the state after `server_round` into the recorder's results folder (mode 0600).

    `strategy_state` is the strategy's own JSON-able state (`FedsiteStrategy.state_dict`), read
    back from `Checkpoint.meta["strategy"]`; `state_arrays` its arrays (the offsite track's
    refresh and moments), read back from `Checkpoint.state_arrays`."""
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
    payload.update({f"state/{k}": np.asarray(v) for k, v in (state_arrays or {}).items()})
    payload["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

    def write(file: BinaryIO) -> None:
        np.savez(file, **payload)

    return write_atomic(checkpoint_path(out), write, 0o600)


def read_checkpoint(out: str | Path) -> Checkpoint | None:
    """The checkpoint in `out`, or None if there is none; a one-line CheckpointError if it is unusable."""
    path = checkpoint_path(out)
    if not os.path.lexists(path):
        return None
    try:
        return _parse(_read_members(path))
    except _Invalid as err:
        advice = "resume it with that newer Fedsite or use another --out" if err.newer else "move it away or use another --out to start afresh"
        raise CheckpointError(f"checkpoint '{path}': {err}; {advice}") from None


def _read_members(path: Path) -> dict[str, np.ndarray]:
    """Every array in the .npz at `path`, CRC- and size-checked, without unpickling anything."""
    try:
        if not path.is_file():
            raise _Invalid("not a Fedsite checkpoint (not a regular file)")
        size = path.stat().st_size
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise _Invalid(f"cannot be read ({err.strerror or err})") from None
    if magic != b"PK\x03\x04":
        raise _Invalid("not a Fedsite checkpoint (not an .npz archive)")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename
                if not name.endswith(".npy") or info.is_dir():
                    raise _Invalid(f"not a Fedsite checkpoint (unexpected member {name!r})")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise _Invalid(f"not a Fedsite checkpoint (member {name!r} is compressed)")
                if max(info.file_size, info.compress_size) > size:
                    raise _Invalid(f"truncated or corrupted (member {name!r} claims {info.file_size} bytes, the file has {size})")
                arrays[name[: -len(".npy")]] = _npy(name, archive.read(info))  # read() checks the CRC
    except _READ_ERRORS as err:
        raise _Invalid(f"truncated or corrupted ({type(err).__name__}: {_first_line(err)})") from None
    except RecursionError:  # an array header nested absurdly deep
        raise _Invalid("truncated or corrupted (an array header nests too deeply)") from None
    return arrays


def _npy(name: str, data: bytes) -> np.ndarray:
    """One .npy member: a plain numeric array whose header agrees with the bytes it holds."""
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise _Invalid(f"not a Fedsite checkpoint (member {name!r} is .npy format {version[0]}.{version[1]})")
    shape, _, dtype = readers[version](buffer)
    if dtype.hasobject:
        raise _Invalid(f"not a Fedsite checkpoint (member {name!r} holds Python objects, which are never unpickled)")
    if dtype.kind not in "biuf":
        raise _Invalid(f"not a Fedsite checkpoint (member {name!r} holds {dtype}, not numbers)")
    declared, held = math.prod(shape) * dtype.itemsize, len(data) - buffer.tell()
    if declared != held:
        raise _Invalid(f"truncated or corrupted (member {name!r} declares {declared} bytes of data and holds {held})")
    buffer.seek(0)
    return np.lib.format.read_array(buffer, allow_pickle=False)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"


def _parse(arrays: dict[str, np.ndarray]) -> Checkpoint:
    """A Checkpoint from the members of the file, every field of its meta checked."""
    if "meta" not in arrays:
        raise _Invalid("not a Fedsite checkpoint (missing 'meta')")
    raw = arrays.pop("meta")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _Invalid(f"not a Fedsite checkpoint ('meta' is {raw.dtype} of shape {raw.shape}, not JSON bytes)")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _Invalid(f"not a Fedsite checkpoint ('meta' is not JSON: {_first_line(err)})") from None
    if not isinstance(meta, dict) or "version" not in meta:
        raise _Invalid("not a Fedsite checkpoint ('meta' has no version)")
    version = meta["version"]
    if not _is_count(version) or version < 1:
        raise _Invalid(f"not a Fedsite checkpoint (version {version!r})")
    if version > VERSION:
        raise _Invalid(f"written by checkpoint version {version}, this Fedsite reads version {VERSION}", newer=True)
    _check_meta(meta)
    unexpected = sorted(k for k in arrays if not k.startswith(("global/", "opt/", STATE_REFRESH, STATE_OPT)))
    if unexpected:
        raise _Invalid(f"not a Fedsite checkpoint (unexpected member {unexpected[0]!r})")
    global_arrays, opt = under(arrays, "global/"), under(arrays, "opt/")
    if not global_arrays:
        raise _Invalid("corrupted (no global arrays)")
    offsite_opt = under(arrays, STATE_OPT)
    for moments in (opt, offsite_opt):
        try:
            if moments and server_opt.state_from_arrays(moments).step < 0:
                raise ValueError("server optimizer state: step < 0")
        except (ValueError, TypeError) as err:  # e.g. an unexpected key, or a step that is not one number
            raise _Invalid(f"corrupted ({_first_line(err)})") from None
    refresh = {k: v for k, v in arrays.items() if k.startswith(STATE_REFRESH)}
    for name, value in refresh.items():
        if value.ndim != 2 or value.dtype.kind != "f" or not np.isfinite(value).all() or not name.endswith((".lora_A", ".lora_B")):
            raise _Invalid(f"corrupted (emulator refresh member {name!r} is not a finite matrix of LoRA factors)")
    offsite = (meta.get("strategy") or {}).get("offsite")  # _check_meta: an object or None
    if refresh and not (isinstance(offsite, dict) and _is_count(offsite.get("refresh_round")) and offsite["refresh_round"] >= 1):
        raise _Invalid("corrupted (an emulator refresh without the round it was made for)")
    state = under(arrays, "state/")
    return Checkpoint(meta["round"], global_arrays, opt, meta, state)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_meta(meta: dict[str, Any]) -> None:
    """Every field `restore` and `check_same_config` use has the right type (raises _Invalid)."""

    def bad(field: str, expected: str, value: object) -> _Invalid:
        shown = repr(value) if len(repr(value)) <= 40 else f"{type(value).__name__}"
        return _Invalid(f"corrupted ('{field}' must be {expected}, got {shown})")

    if not _is_count(meta.get("round")):
        raise bad("round", "an integer >= 0", meta.get("round"))
    if not isinstance(meta.get("config"), dict):
        raise bad("config", "an object", meta.get("config"))
    recorder = meta.get("recorder")
    if not isinstance(recorder, dict):
        raise bad("recorder", "an object", recorder)
    if recorder.get("initial") is not None and not isinstance(recorder.get("initial"), dict):
        raise bad("recorder.initial", "an object or null", recorder.get("initial"))
    rounds = recorder.get("rounds")
    if not isinstance(rounds, list) or not all(isinstance(row, dict) for row in rounds):
        raise bad("recorder.rounds", "a list of objects", rounds)
    sizes = recorder.get("jsonl")
    if not isinstance(sizes, dict) or not all(_is_count(n) for n in sizes.values()):
        raise bad("recorder.jsonl", "an object of file sizes", sizes)
    dp = meta.get("client_dp")
    if dp is not None:
        if not isinstance(dp, dict):
            raise bad("client_dp", "an object or null", dp)
        if not _is_number(dp.get("clip_norm")) or not dp["clip_norm"] > 0:
            raise bad("client_dp.clip_norm", "a number > 0", dp.get("clip_norm"))
        if not _is_count(dp.get("rounds")):
            raise bad("client_dp.rounds", "an integer >= 0", dp.get("rounds"))
    strategy = meta.get("strategy")
    if strategy is not None and not isinstance(strategy, dict):
        raise bad("strategy", "an object or null", strategy)
    offsite = (strategy or {}).get("offsite")
    if offsite is not None and not (isinstance(offsite, dict) and (offsite.get("refresh_round") is None or _is_count(offsite["refresh_round"]))):
        raise bad("strategy.offsite", "an object whose refresh_round is a round number", offsite)
    try:  # the states go into throwaway generators, whose own checks are thorough
        _set_rng_state(meta["rng"], random.Random(), np.random.RandomState())
    except (KeyError, IndexError, TypeError, ValueError, OverflowError):
        raise bad("rng", "the states of Python's and NumPy's generators", meta.get("rng")) from None


def check_same_config(checkpoint: Checkpoint, config: FedsiteConfig, path: Path) -> None:
    """Raise a one-line CheckpointError naming the first field that differs. A field the
    checkpoint lacks (written before the field existed) counts as having its default."""
    saved, now = {**FedsiteConfig().to_flat(), **checkpoint.meta["config"]}, config.to_flat()

    def without_effect(key: str) -> bool:  # e.g. selection-fairness-weight when both runs select uniformly
        gate = next((g for prefix, g in _GATED.items() if key.startswith(prefix)), None)
        return gate is not None and saved.get(gate) == now.get(gate) == _GATES[gate]

    for key in sorted(set(saved) | set(now)):
        if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key) and not without_effect(key):
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
    """Put the checkpoint's state back into the run's objects, then cut the JSONL files back.

    `read_checkpoint` has checked every field, and the files are cut last: nothing in the
    results folder changes unless the whole state could be restored.
    """
    saved = checkpoint.meta["recorder"]
    if aggregator is not None and checkpoint.server_opt:
        aggregator.state = server_opt.state_from_arrays(checkpoint.server_opt)
    if client_dp is not None and checkpoint.meta.get("client_dp"):
        client_dp.load_state_dict(checkpoint.meta["client_dp"])
    _set_rng_state(checkpoint.meta["rng"])
    recorder.initial, recorder.rounds = saved["initial"], list(saved["rounds"])
    for path in recorder.out.glob("*.jsonl"):
        size = saved["jsonl"].get(path.name, 0)
        if path.stat().st_size > size:
            with path.open("r+b") as f:
                f.truncate(size)
    log.info("[fedsite] resuming from the checkpoint after round %d in %s", checkpoint.round, recorder.out)


def remove_checkpoint(out: str | Path) -> None:
    """A finished run needs no checkpoint: the next run in this folder starts afresh."""
    checkpoint_path(out).unlink(missing_ok=True)
