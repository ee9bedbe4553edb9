"""End to end over loopback with real processes: `fedsite coordinator` (Flower SuperLink on loopback
behind the Fleet-only TLS gateway, ServerApp, SuperNode authentication) and `fedsite client` SuperNodes
on their own JSONL data.

One coordinator serves a 3-round run to three enrolled clients, while the public address refuses
Flower's Control and Runtime APIs and `/docs`, an outsider fails to register its own key through
it, and neither the outsider's SuperNode nor an unenrolled one gets past Flower's own activation
check. Then a second run is killed (the whole coordinator process tree, SIGKILL) after its round-2
checkpoint and started again: it resumes at round 3 with the same clients, which reconnected by
themselves. Last, a coordinator serving a prebuilt emulator package from its artifact service gets
one `--no-backbone` client that fetches it over TLS, signed with its enrolment key, and verifies it
against the key pinned on its own command line.
Run alone with `pytest tests -k e2e_network` (slow: several minutes on 2 busy cores).
Every process started here is stopped at the end, also on failure.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl

import psutil
import pytest

from coordinator.checkpoint import read_checkpoint
from simulations.local_network import CLIENTS, FLWR, LocalNetwork, free_port, rows

SMALL = ["--model", "tiny", "--local-steps", "2", "--batch-size", "4", "--train-per-task", "10", "--test-per-task", "2",
         "--eval-examples", "6", "--max-new-tokens", "4", "--round-timeout", "300"]  # fmt: skip
RUN = [*SMALL, "--rounds", "3", "--clients", "3", "--min-train-clients", "3"]  # `--rounds`: the alias the service contract uses
DEADLINE = 420.0  # seconds for one run on a busy machine
REFUSED = [("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-node"), ("POST", "/v1/control/list-runs"),
           ("POST", "/v1/runtime/acquire-task"), ("POST", "/v1/runtime/pull-messages"), ("GET", "/docs"), ("GET", "/openapi.json"),
           ("POST", "/v1/fleet/../control/start-run"), ("POST", "/v1/fleet/%2e%2e/control/list-runs")]  # fmt: skip
FLOWER_ACTIVATION_REFUSED = "[code: 2004] Failed to activate SuperNode."  # what a SuperNode prints when activate-node is rejected


def wait_for(net: LocalNetwork, condition, what: str, timeout: float = DEADLINE) -> None:
    if not net.wait_for(condition, timeout):
        pytest.fail(f"timed out waiting for {what}\n{net.logs()}")


def https(port: int, ca, method: str, path: str) -> int:
    """Status of one request sent as written (http.client does not normalize `..` or percent-escapes)."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(cafile=str(ca)), timeout=30)
    try:
        connection.request(method, path, body=b"" if method == "POST" else None, headers={"content-type": "application/protobuf"})
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = LocalNetwork(tmp_path_factory.mktemp("e2e_network"), enrolled={"enrolled": CLIENTS, "enrolled-emulator": ("emulator",)}, others=("intruder", "outsider"))
    try:
        yield net
    finally:
        net.stop_all()


def test_e2e_network_three_clients_tls_auth_three_rounds(network):
    net, root, port = network, network.root, network.port
    coord = net.coordinator("run", RUN)
    wait_for(net, lambda: "submitted" in (root / "coordinator-run.log").read_text(), "the coordinator to enrol the keys and submit the run")
    for i in (1, 2, 3):
        net.client(f"client-{i}", f"data-{i - 1}.jsonl")
    intruder = net.client("intruder", "data-0.jsonl", "--max-retries", "0")  # a key nobody enrolled

    # the public address is the gateway: Flower's Control and Runtime APIs and its docs are not there
    statuses = {f"{method} {path}": https(port, net.ca, method, path) for method, path in REFUSED}
    print(f"\npublic address refusals: {statuses}")
    assert all(status in (403, 404) for status in statuses.values()), statuses
    assert https(port, net.ca, "GET", "/health") == 200  # while the Fleet side answers

    # an outsider cannot register its own key through the public address ...
    (root / "outsider-home").mkdir()
    public = {"address": f"127.0.0.1:{port}", "root-certificates": str(net.ca)}
    (root / "outsider-home" / "config.toml").write_text(f'[superlink]\ndefault = "public"\n[superlink.public]\naddress = "{public["address"]}"\nroot-certificates = "{public["root-certificates"]}"\n')
    done = net.run([FLWR, "supernode", "register", "keys/outsider.pub", "public", "--format", "json"], root / "outsider-home")
    answer = json.loads(done.stdout)
    assert answer["success"] is False and "404 Not Found" in answer["error-message"], done.stdout + done.stderr
    # ... so its SuperNode, like the unenrolled intruder's, is turned away by Flower's own activation check
    outsider = net.client("outsider", "data-1.jsonl", "--max-retries", "0")
    for name, proc in (("intruder", intruder), ("outsider", outsider)):
        assert proc.wait(timeout=DEADLINE) != 0
        text = (root / f"{name}.log").read_text()
        assert FLOWER_ACTIVATION_REFUSED in text and "refused by the coordinator" in text, text[-3000:]
    listed = net.run([FLWR, "supernode", "list", "fedsite", "--format", "json"], root / "state" / "flwr-home")
    assert len(json.loads(listed.stdout)["nodes"]) == 3, listed.stdout  # through loopback: exactly the three enrolled keys

    assert coord.wait(timeout=DEADLINE) == 0, (root / "coordinator-run.log").read_text()[-3000:]
    out = root / "run"
    baseline, *metrics = rows(out)
    assert baseline["round"] == 0 and "contributors" not in baseline  # the round-0 evaluation comes first
    assert [r["round"] for r in metrics] == [1, 2, 3]
    not_accepted = [c for c in rows(out, "clients.jsonl") if c["status"] != "accepted"]
    assert all(len(r["contributors"]) == 3 for r in metrics), (  # node ids of the three enrolled clients
        [(r["round"], r["contributors"], r.get("dropped")) for r in metrics], not_accepted, net.logs())
    assert len({c for r in metrics for c in r["contributors"]}) == 3
    clients = rows(out, "clients.jsonl")
    assert len(clients) == 9 and all(c["status"] == "accepted" for c in clients)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "summary.md").is_file()
    assert read_checkpoint(out) is None  # a finished run leaves no checkpoint


def test_e2e_network_coordinator_killed_after_round_2_resumes(network):
    net, root = network, network.root  # the three clients from the first test are still running
    out = root / "resumed"
    first = net.coordinator("resumed", RUN)
    wait_for(net, lambda: (c := read_checkpoint(out)) is not None and c.round == 2, "the round-2 checkpoint")
    stop_tree = [first, *psutil.Process(first.pid).children(recursive=True)]
    for proc in stop_tree:  # a crash: no clean shutdown anywhere in the coordinator
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    first.wait()
    assert len(rows(out)) in (3, 4)  # the baseline and rounds 1-2; round 3 may have written its row already: resume cuts it back

    second = net.coordinator("resumed", RUN)
    assert second.wait(timeout=DEADLINE) == 0, (root / "coordinator-resumed.log").read_text()[-3000:]
    assert "resuming from the checkpoint after round 2" in (root / "coordinator-resumed.log").read_text()
    metrics = rows(out)
    assert [r["round"] for r in metrics] == [0, 1, 2, 3]  # as many rounds as an uninterrupted run, none twice
    assert len(metrics[-1]["contributors"]) == 3  # the clients reconnected to the restarted coordinator
    client_rounds = [c["round"] for c in rows(out, "clients.jsonl")]
    assert sorted(client_rounds) == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["initial"] is not None


def test_e2e_network_emulator_client_fetches_its_package_over_tls_against_a_pinned_key(network):
    """Its own coordinator (port, state, enrolment): the three LoRA clients keep polling the first one."""
    from client.artifacts import FetchOptions, fetch_artifact
    from emulator.cli import build_package
    from protos.artifacts import ArtifactError

    net, root = network, network.root
    build_package("tiny", root / "emu" / "pkg")  # signed with emu/keys/signing_key.pem; clients pin emu/keys/public_key.pem
    at, artifacts = free_port(), free_port()
    run = [*SMALL, "--clients", "1", "--rounds", "1", "--min-train-clients", "1", "--emulator-share", "0.01", "--emulator-package", str(root / "emu" / "pkg"),
           "--artifact-url", f"127.0.0.1:{artifacts}", "--artifacts", "emulator-run/artifacts", "--artifact-address", f"127.0.0.1:{artifacts}", "--artifact-key", "emu/keys/signing_key.pem"]  # fmt: skip
    coord = net.coordinator("emulator-run", run, at=at, enroll="enrolled-emulator", state="state-emulator")
    log = root / "coordinator-emulator-run.log"
    wait_for(net, lambda: "submitted" in log.read_text(), "the emulator coordinator to submit its run")
    home = root / "emulator-home"  # the device's own caches (artifacts, privacy ledger), not the user's
    net.client("emulator", "data-2.jsonl", "--no-backbone", "--artifact-public-key", "emu/keys/public_key.pem", at=at, HOME=str(home))

    # the artifact service answers enrolled keys only, over TLS
    options = FetchOptions(attempts=1, stat_timeout_s=30)
    anyone = ("0" * 64, root / "probe-cache", root / "emu" / "keys" / "public_key.pem", root / "certs" / "ca.crt")
    with pytest.raises(ArtifactError, match="UNAUTHENTICATED"):
        fetch_artifact(f"127.0.0.1:{artifacts}", *anyone, options=options)
    with pytest.raises(ArtifactError, match="PERMISSION_DENIED: artifact service: key [0-9a-f]+ is not enrolled"):
        fetch_artifact(f"127.0.0.1:{artifacts}", *anyone, auth_key=root / "keys" / "outsider", options=options)

    assert coord.wait(timeout=DEADLINE) == 0, log.read_text()[-3000:] + net.logs()
    out = root / "emulator-run"
    [baseline, row] = rows(out)
    assert baseline["round"] == 0
    [entry] = rows(out, "clients.jsonl")
    assert entry["status"] == "accepted" and entry["package_kind"] == "emulator", (entry, net.logs())
    assert len(row["contributors_by_kind"]["emulator"]) == 1 and not row["contributors_by_kind"]["lora"]
    text = log.read_text()
    cached = [p.parent.name for p in (home / ".cache" / "fedsite" / "artifacts").glob("*/manifest.sig")]
    assert len(cached) == 1, net.logs()  # fetched into the device's cache, verified there, under its sha256
    for method in ("Stat", "Fetch"):  # both calls came signed by the enrolled device key
        assert f"artifact service: {method} of {cached[0][:12]} for enrolled key emulator.pub" in text, text[-3000:]
