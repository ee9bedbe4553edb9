"""A coordinator and its edge clients as real processes on one machine, over loopback.

For the network end-to-end tests and benchmarks: `LocalNetwork(root)` makes a test CA, server
certificate and client keys, enrols the ones asked for (one folder of public keys per enrolment
set), writes each data client's JSONL data from the built-in tasks, and starts `fedsite
coordinator` / `fedsite client` processes (their output in ROOT/<name>.log). `stop_all` stops
every process it started with its children, and any process still naming ROOT (Flower detaches
its SuperExec into a new session).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from coordinator.certs import write_certs, write_node_key
from finetune.processes import stop_process_tree
from finetune.tasks import builtin_splits

FEDSITE = [sys.executable, "-m", "fedsite"]
FLWR = str(Path(sys.executable).parent / "flwr")
CLIENTS = ("client-1", "client-2", "client-3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(out: str | Path, name: str = "metrics.jsonl") -> list[dict]:
    """The JSON lines of a results file (none before it exists)."""
    path = Path(out) / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class LocalNetwork:
    def __init__(
        self,
        root: Path,
        enrolled: Mapping[str, Sequence[str]] | None = None,
        others: Sequence[str] = (),
        data_clients: int = 3,
        examples_per_task: int = 8,
    ) -> None:
        """Keys for every name in `enrolled` (folder -> names, default {"enrolled": client-1..3}) and
        in `others` (never enrolled); ROOT/data-<i>.jsonl for `data_clients` clients."""
        self.root = Path(root)
        self.port = free_port()
        self.started: list[subprocess.Popen] = []
        enrolled = {"enrolled": CLIENTS} if enrolled is None else enrolled
        write_certs(self.root / "certs")
        for name in {*[n for names in enrolled.values() for n in names], *others}:
            write_node_key(self.root / "keys", name)
        for folder, names in enrolled.items():
            (self.root / folder).mkdir(parents=True, exist_ok=True)
            for name in names:
                (self.root / folder / f"{name}.pub").write_bytes((self.root / "keys" / f"{name}.pub").read_bytes())
        train, test = builtin_splits(examples_per_task, 2, 0)
        examples = list(train) + list(test)
        for i in range(data_clients):
            lines = [json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output}) for e in examples[i::data_clients]]
            (self.root / f"data-{i}.jsonl").write_text("\n".join(lines) + "\n")
        python_bin = str(Path(sys.executable).parent)  # Flower starts flower-superexec and friends by name
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_HOME": str(self.root / "home"), "PATH": os.pathsep.join([python_bin, os.environ.get("PATH", "")])}  # fmt: skip

    @property
    def ca(self) -> Path:
        return self.root / "certs" / "ca.crt"

    def start(self, args: Sequence[str], log: str, **env: str) -> subprocess.Popen:
        with (self.root / log).open("ab") as out:
            proc = subprocess.Popen(list(args), cwd=self.root, env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(proc)
        return proc

    def run(self, args: Sequence[str], home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
        """A short command (e.g. `flwr ...`) with its own FLWR_HOME, waited for."""
        return subprocess.run(list(args), cwd=self.root, env={**self.env, "FLWR_HOME": str(home)}, capture_output=True, text=True, timeout=timeout)

    def coordinator(self, out: str, run: Sequence[str], *, at: int | None = None, enroll: str = "enrolled", state: str = "state") -> subprocess.Popen:
        args = ["coordinator", "--address", f"127.0.0.1:{at or self.port}", "--certs", "certs", "--enroll", enroll, "--state", state, "--out", out]
        return self.start([*FEDSITE, *args, *run], f"coordinator-{out}.log")

    def client(self, name: str, data: str, *extra: str, at: int | None = None, **env: str) -> subprocess.Popen:
        args = ["client", "--coordinator", f"127.0.0.1:{at or self.port}", "--data", data, "--root-certificates", "certs/ca.crt",
                "--key", f"keys/{name}", "--runtime-port", str(free_port()), "--threads", "1", *extra]  # fmt: skip
        return self.start([*FEDSITE, *args], f"{name}.log", **env)

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.5)
        return False

    def logs(self) -> str:
        """The end of every process log, for a failure message."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(self.root.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.started:
            stop_process_tree(proc, grace=5.0)
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.root) in part for part in proc.info["cmdline"] or []):
                    stop_process_tree(proc, grace=2.0)
            except psutil.Error:
                pass
