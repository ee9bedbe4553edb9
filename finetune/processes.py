"""Starting and stopping Flower's processes: shared by the coordinator service and the edge client.

Flower's command-line tools (`flower-superlink`, `flower-supernode`, `flwr`) are found beside
this Python first (the virtual environment's), get an environment of their own (FLWR_HOME, no
update check), and are stopped with everything they started (Flower detaches its SuperExec).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
