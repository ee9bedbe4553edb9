"""A real two-node Ray cluster on loopback for tests: a head and a second node, one CPU each.

Each node is `ray start --block` in its own process group with its own `--temp-dir`, so each
keeps its own log folder (`<temp-dir>/session_latest/logs/`, where Ray writes the stdout and
stderr of every worker that ran on that node). Every port a node would take by default is a
free one picked here, so the cluster never meets another Ray on this machine. Stopping sends
SIGTERM to the two `ray start` processes (a blocking `ray start` stops its own processes on
SIGTERM), then kills whatever is left of them by pid: their process groups, and any process
whose command line names this cluster's temp folder. Never `ray stop`: it stops every Ray on
the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

STARTED = "Ray runtime started"
START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    temp_dir: Path
    proc: subprocess.Popen
    log: Path

    def logs(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def worker_output(self) -> str:
        """Everything the workers that ran on this node wrote to stderr and stdout."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs().glob("worker-*")) if p.is_file())


@dataclass
class Cluster:
    address: str
    root: Path
    nodes: list[Node] = field(default_factory=list)


def _ray() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def _start(name: str, root: Path, args: list[str]) -> Node:
    temp_dir = root / name
    log = root / f"{name}.log"
    command = [
        _ray(), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
        "--temp-dir", str(temp_dir), "--object-store-memory", str(100 * 2**20), "--disable-usage-stats",
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()), *args,
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    node = Node(name, temp_dir, proc, log)
    deadline = time.monotonic() + START_TIMEOUT
    while STARTED not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray node '{name}' did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    return node


def leftovers(root: Path) -> list[psutil.Process]:
    """Live processes whose command line names `root` (only this cluster's own name it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(root) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def stop(cluster: Cluster, grace: float = 30.0) -> list[int]:
    """Stop every node (the second one first); return the pids that had to be killed."""
    for node in reversed(cluster.nodes):
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
            try:
                node.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
    killed = []
    for node in cluster.nodes:
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)  # its own session: only what it started
        except (ProcessLookupError, PermissionError):
            pass
        if node.proc.poll() is None:
            node.proc.kill()
        node.proc.wait(10)
    time.sleep(0.5)
    for proc in leftovers(cluster.root):  # reparented leftovers that name this cluster's folder
        killed.append(proc.pid)
        try:
            proc.kill()
        except psutil.Error:
            pass
    return killed


@contextmanager
def two_node_cluster(root: Path) -> Iterator[Cluster]:
    """A head and one more node on 127.0.0.1, one CPU each; both stopped on the way out, even
    when the body (or the start of the second node) fails."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cluster = Cluster(f"127.0.0.1:{port}", root)
    try:
        cluster.nodes.append(_start("head", root, [
            "--head", "--port", str(port), "--include-dashboard", "false", "--dashboard-port", str(free_port()),
            "--ray-client-server-port", str(free_port()),
        ]))
        cluster.nodes.append(_start("node", root, ["--address", cluster.address]))
        yield cluster
    finally:
        stop(cluster)
