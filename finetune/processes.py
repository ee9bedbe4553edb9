"""Starting and stopping Flower's processes: shared by the coordinator service and the edge client.

Flower's command-line tools (`flower-superlink`, `flower-supernode`, `flwr`) are found beside
this Python first (the virtual environment's), get an environment of their own (FLWR_HOME, no
update check), and are stopped with everything they started (Flower detaches its SuperExec).
Their object pulls retry quickly (`quick_object_pulls`).
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import psutil


def flower_tool(name: str) -> str:
    """A Flower command installed beside this Python (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


SUPEREXEC_POLL_SECONDS = 0.1  # Flower's SuperExec checks for new tasks every 1 s by default


def flower_env(home: str | Path, threads: int = 0, task_poll_seconds: float = SUPEREXEC_POLL_SECONDS) -> dict[str, str]:
    """Environment of Flower's processes: their own FLWR_HOME, no update check, and a SuperExec
    that polls for tasks every `task_poll_seconds` (FLWR_SUPEREXEC_TASK_POLL_INTERVAL, in seconds,
    0.01 to 60, read by flwr/supercore/superexec/run_superexec.py). This Python's own folder
    comes first on PATH: Flower starts `flower-superexec` by name, and an unactivated virtual
    environment would not have it on PATH."""
    here = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([here, *[p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != here]]),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FLWR_HOME": str(Path(home).resolve()),
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": repr(float(task_poll_seconds)),
    }
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def stop_process_tree(proc: subprocess.Popen | psutil.Process, grace: float = 10.0) -> None:
    """Stop a process and everything it started (Flower detaches its SuperExec into a new session)."""
    try:
        root = proc if isinstance(proc, psutil.Process) else psutil.Process(proc.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    if isinstance(proc, subprocess.Popen):
        proc.wait()


PULL_BACKOFF_SECONDS = 0.05  # first retry of an object not there yet (Flower: 1 s, doubling to 10 s)
PULL_BACKOFF_CAP_SECONDS = 0.5


def quick_object_pulls(module: ModuleType, name: str = "pull_objects") -> None:
    """Make `module`'s Flower object pulls (`name`: `pull_objects` or `pull_and_inflate_object_from_tree`)
    retry an object that is not there yet after 0.05 s, backing off to 0.5 s, instead of Flower's
    1 s doubling to 10 s.

    A message's objects reach a store after the message itself: the SuperNode pulls a message and
    its objects from the SuperLink while its task is already claimable, and the ServerApp pushes a
    round's messages before their objects. Whoever pulls in between meets an unavailable object and,
    with Flower's backoff, waits 1 s, then 2 s more, then 4 s more (`flwr/supercore/constant.py`,
    `PULL_INITIAL_BACKOFF`, settable by no option): seconds of every networked message. Only the
    retry timing changes; the retry limits and errors are Flower's.
    """
    from flwr.supercore.inflatable import inflatable_utils  # noqa: PLC0415 (flwr is loaded where this is called)

    original = getattr(inflatable_utils, name)
    current = getattr(module, name, None)
    if isinstance(current, functools.partial) and current.func is original:
        return  # already quick
    if current is not original or not {"initial_backoff", "backoff_cap"} <= set(inspect.signature(original).parameters):
        raise RuntimeError(f"{module.__name__}.{name} is not Flower's {name} with a backoff: this Flower version differs")
    setattr(module, name, functools.partial(original, initial_backoff=PULL_BACKOFF_SECONDS, backoff_cap=PULL_BACKOFF_CAP_SECONDS))
