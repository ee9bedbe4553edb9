"""The edge client's SuperNode command, node config and restart policy (no network needed)."""

import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from client import edge
from client.edge import EdgeSettings, client_home, node_config, run_edge, supernode_command
from finetune.processes import stop_process_tree


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "my data.jsonl"
    path.write_text('{"instruction": "i", "input": "", "output": "o"}\n')
    return str(path)


def test_node_config_carries_data_path_and_profile_through_flowers_parser(data):
    from flwr.common.config import parse_config_args

    plain = parse_config_args([node_config(EdgeSettings("h:1", data, memory_gb=2.5))])
    state_dir = plain.pop("state-dir")
    ledger = plain.pop("privacy-ledger")
    assert state_dir.endswith("client-state") and ledger.startswith(state_dir) and ledger.endswith(".json")
    assert plain == {"data-path": data, "memory-gb": 2.5, "holds-backbone": True, "quantized": False, "device": "auto"}
    settings = EdgeSettings("h:1", data, memory_gb=4.0, holds_backbone=False, quantized=True, profile="phone", device="cpu")
    assert parse_config_args([node_config(settings)]) == {
        "data-path": data, "memory-gb": 4.0, "holds-backbone": False, "quantized": True, "device": "cpu", "profile": "phone", "state-dir": state_dir, "privacy-ledger": ledger,
    }


def test_node_config_carries_the_devices_privacy_policy(data, tmp_path):
    from flwr.common.config import parse_config_args

    settings = EdgeSettings("h:1", data, dp_min_noise=1.2, epsilon_budget=4.0, delta=1e-6, privacy_ledger=str(tmp_path / "ledger.json"))
    values = parse_config_args([node_config(settings)])
    assert values["dp-min-noise"] == 1.2 and values["dp-epsilon-budget"] == 4.0 and values["dp-delta"] == 1e-6
    assert values["privacy-ledger"] == str(tmp_path / "ledger.json")
    other = tmp_path / "other.jsonl"
    other.write_text(open(data).read())
    assert parse_config_args([node_config(EdgeSettings("h:1", str(other)))])["privacy-ledger"] != parse_config_args([node_config(EdgeSettings("h:1", data))])["privacy-ledger"]


def test_supernode_command_uses_tls_key_and_reconnects_forever(data, tmp_path):
    ca, key = tmp_path / "ca.crt", tmp_path / "client-1"
    ca.write_text("x")
    key.write_text("x")
    command = supernode_command(EdgeSettings("10.0.0.5:9092", data, str(ca), str(key), runtime_port=9123))
    assert command[1:5] == ["-m", "client.supernode", "--poll-interval", "0.5"]
    args = dict(zip(command[5::2], command[6::2]))
    assert args["--superlink"] == "10.0.0.5:9092" and args["--root-certificates"] == str(ca) and args["--auth-supernode-private-key"] == str(key)
    assert args["--port"] == "9123"
    assert "--insecure" not in command and "--max-retries" not in command and "--max-wait-time" not in command
    assert "--executor-secret" not in command  # Flower's own SuperExec unless run_edge names the secret


def test_run_edge_runs_the_tasks_in_the_executor_with_a_secret_in_the_workers_folder(data, tmp_path):
    command = supernode_command(EdgeSettings("h:1", data, insecure=True), tmp_path / "worker" / edge.EXECUTOR_SECRET)
    at = command.index("--executor-secret")
    assert command[at + 1] == str(tmp_path / "worker" / "superexec.secret") and at < command.index("--superlink")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"coordinator": "nohost"}, "must be HOST:PORT"),
        ({"data": "/nonexistent.jsonl"}, "--data '/nonexistent.jsonl' does not exist"),
        ({"key": "/nonexistent-key"}, "--key '/nonexistent-key' does not exist"),
        ({"memory_gb": -1.0}, "--memory-gb must be non-negative"),
        ({"dp_min_noise": -1.0}, "--dp-min-noise must be a finite number >= 0"),
        ({"epsilon_budget": float("nan")}, "--epsilon-budget must be a finite number >= 0"),
        ({"delta": 1.0}, "--delta must be below 1"),
    ],
)
def test_bad_settings_are_one_line_errors(data, changes, message):
    settings = EdgeSettings(**{"coordinator": "h:1", "data": data, **changes})
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        settings.validate()
    assert "\n" not in str(err.value)


def test_a_refused_supernode_is_restarted_until_out_of_tries(data, monkeypatch, caplog):
    starts = []

    def refused(settings, executor_secret=None):
        starts.append(1)
        return [sys.executable, "-c", "import sys; sys.exit(3)"]

    monkeypatch.setattr(edge, "supernode_command", refused)
    monkeypatch.setattr(edge.time, "sleep", lambda seconds: None)
    caplog.set_level("INFO", logger="fedsite.client")
    monkeypatch.setattr(edge.log, "propagate", True)  # restored as it was after the test
    code = run_edge(EdgeSettings("h:1", data, insecure=True, max_retries=2))
    assert code == 3
    # run_edge builds the command once and starts it three times (the first try and two restarts)
    assert len(starts) == 1
    assert caplog.text.count("restarting in") == 2 and "giving up" in caplog.text


def test_stop_process_tree_stops_children_too():
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = psutil.Process(parent.pid).children()[0]
    stop_process_tree(parent, grace=5.0)
    assert parent.poll() is not None and not child.is_running()


def test_clients_on_one_machine_get_their_own_flower_home(tmp_path, monkeypatch):
    # two SuperNodes installing the run's app into one FLWR_HOME at once can load a half-copied app
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    first, second = client_home(9094), client_home(9095)
    assert first != second and first.parent == second.parent == tmp_path / "flwr"
    assert client_home(9094, tmp_path / "mine") == tmp_path / "mine"  # --home wins
    monkeypatch.delenv("FLWR_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert client_home(9094).parent == tmp_path / ".flwr"


def test_flower_processes_poll_for_tasks_every_tenth_of_a_second(monkeypatch, tmp_path):
    from flwr.supercore.superexec.run_superexec import _get_task_poll_interval

    from finetune.processes import flower_env

    env = flower_env(tmp_path)
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"])
    assert _get_task_poll_interval() == 0.1  # Flower's own parser, in seconds


def test_the_worker_socket_and_owner_join_the_node_config(data):
    from flwr.common.config import parse_config_args

    from client.private_socket import WorkerFiles

    files = WorkerFiles(Path("/tmp/fedsite w/worker.sock"))
    command = edge.with_worker(supernode_command(EdgeSettings("h:1", data, insecure=True)), files, 4321)
    values = parse_config_args([command[command.index("--node-config") + 1]])
    assert values["worker-socket"] == "/tmp/fedsite w/worker.sock" and values["worker-owner-pid"] == 4321 and values["data-path"] == data
    assert edge.with_worker(["flower-supernode"], files, 1)[1:] == ["--node-config", 'worker-socket="/tmp/fedsite w/worker.sock" worker-owner-pid=1']


SUPERNODE_THAT_WAITS_FOR_THE_WORKER = """
import json, sys, time
from pathlib import Path
from flwr.common.config import parse_config_args
from client.private_socket import connect
node = parse_config_args([sys.argv[-1]])
deadline = time.monotonic() + 120
while True:
    try:
        sock, pid = connect(Path(node["worker-socket"]), 5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
sock.close()
json.dump({"node": node, "worker": pid}, open(sys.argv[1], "w"))
sys.exit(3)
"""


def test_run_edge_starts_the_worker_beside_the_supernode_and_stops_it_on_exit(data, tmp_path, monkeypatch, caplog):
    """A stand-in SuperNode finds the worker through its node config, then exits; run_edge stops the worker."""
    seen = tmp_path / "seen.json"
    monkeypatch.setattr(edge, "supernode_command", lambda settings, executor_secret=None: [sys.executable, "-c", SUPERNODE_THAT_WAITS_FOR_THE_WORKER, str(seen)])
    caplog.set_level("INFO", logger="fedsite.client")
    monkeypatch.setattr(edge.log, "propagate", True)  # restored as it was after the test
    with tempfile.TemporaryDirectory(prefix="fse-", dir="/tmp") as home:
        assert run_edge(EdgeSettings("h:1", data, insecure=True, max_retries=0), home=home) == 3
        found = json.loads(seen.read_text())
        assert found["node"]["worker-owner-pid"] == os.getpid() and found["node"]["worker-socket"] == str(Path(home) / "worker" / "worker.sock")
        assert stat.S_IMODE(os.stat(Path(home) / "worker").st_mode) == 0o700
        pid = int(re.search(r"warm worker pid (\d+)", caplog.text).group(1))
        assert found["worker"] == pid  # the worker run_edge started answered the node config's socket
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert "exited with code" not in caplog.text  # stopped, not lost
        assert not (Path(home) / "worker" / "worker.sock").exists()


def test_flowers_processes_find_the_tools_beside_this_python(tmp_path, monkeypatch):
    """Flower starts `flower-superexec` by name: an unactivated venv's bin folder must be on PATH."""
    import os
    from pathlib import Path

    from finetune.processes import flower_env

    monkeypatch.setenv("PATH", "/usr/bin")
    path = flower_env(tmp_path)["PATH"].split(os.pathsep)
    assert path[0] == str(Path(sys.executable).parent) and "/usr/bin" in path
