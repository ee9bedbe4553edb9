"""`fedsite simulate --ray-address` on a real two-node Ray cluster (loopback, one CPU per node).

Where each client trained is read from Ray itself: every node keeps the output of the workers
that ran on it in its own log folder, and a simulated client's progress line ("client 0
round 1: ...") is written by the worker that trained it.
"""

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.simulations.ray_cluster import leftovers, two_node_cluster

CLIENT_LINE = re.compile(r"^client (\d+) round 1: \d+ steps", re.MULTILINE)


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="fsray-"))  # short: Ray's socket paths under it must stay below 108 bytes
    try:
        with two_node_cluster(root) as running:
            yield running
        assert all(node.proc.poll() is not None for node in running.nodes) and not leftovers(root), "a Ray process outlived the cluster"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_simulate_joins_a_running_cluster_and_its_clients_run_on_both_nodes(cluster, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsite", "simulate", "--model", "tiny", "--clients", "2", "--rounds", "1", "--ray-address", cluster.address,
         "--out", str(out), "--local-steps", "3", "--train-per-task", "4", "--test-per-task", "2", "--eval-examples", "4", "--max-new-tokens", "2"],
        capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Ray cluster at {cluster.address}" in proc.stderr
    trained = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    assert sorted(row["client_id"] for row in trained if row.get("status") == "accepted") == [0, 1]
    by_node = {node.name: sorted(int(c) for c in CLIENT_LINE.findall(node.worker_output())) for node in cluster.nodes}
    assert all(by_node.values()), f"a node ran no client: {by_node}"
    assert sorted(c for clients in by_node.values() for c in clients) == [0, 1], by_node
