"""An edge client: Flower's own SuperNode (`flower-supernode`) running the Fedsite ClientApp.

The SuperNode connects to the coordinator's SuperLink over TLS (verified against the
coordinator's CA), signs its requests with its enrolment key (Flower's SuperNode
authentication: the coordinator only admits keys it has enrolled). Its ClientApp tasks run in
one long-lived executor on a thread of the SuperNode's process (client/executor.py), which
forwards each message to the device's warm worker (client/worker.py). Everything the ClientApp needs to know about the device goes into
the node config: the path of its own data (`data-path`, read by `finetune.sources.client_splits`)
and its profile (`memory-gb`, `holds-backbone`, `quantized`, `profile`, and `device`, whose
accelerator the query handler measures and reports) for the coordinator's planner, and what it trusts for artifacts (`root-certificates`, the CA; `artifact-public-key`,
the pinned artifact-signing key; `artifact-auth-key`, its enrolment key, which signs fetches).
The node config stays on the device; the key is named by path, never copied into it. With no retry limit (the default) the SuperNode keeps reconnecting with backoff when
the coordinator goes away, so a restarted coordinator finds its clients again.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from client import supernode
from client.forwarder import OWNER_KEY, SOCKET_KEY, start_worker, stop_worker_at
from client.private_socket import WorkerFiles, private_folder, worker_files
from client.privacy_policy import LEDGER_KEY, DevicePolicy
from client.supernode import DEFAULT_POLL_SECONDS, check_poll
from finetune.processes import flower_env, stop_process_tree

log = logging.getLogger("fedsite.client")

RESTART_DELAY_MAX = 30.0  # seconds between SuperNode restarts, at most
EXECUTOR_SECRET = "superexec.secret"  # in the worker's private folder: the executor's key to claim tasks


@dataclass
class EdgeSettings:
    coordinator: str  # HOST:PORT of the coordinator's SuperLink
    data: str  # this device's data: a .jsonl file or a datasets folder
    root_certificates: str | None = None  # the coordinator's CA certificate (PEM); None = system CAs
    key: str | None = None  # enrolment private key (OpenSSH, EC); None = no node authentication
    artifact_public_key: str | None = None  # the coordinator's artifact-signing public key (PEM), pinned for emulator packages
    insecure: bool = False  # plain HTTP, no TLS (and so no authentication): for local tests only
    memory_gb: float = 0.0  # device profile: memory for the backbone (0 = unknown/unlimited)
    holds_backbone: bool = True  # device profile: may hold the full backbone (else: offsite emulator)
    quantized: bool = False  # device profile: load the backbone in 4-bit
    profile: str = ""  # device profile name, for the coordinator's records
    device: str = "auto"  # where this client trains: auto, cpu, cuda, cuda:N or mps (its accelerator goes into its profile)
    runtime_port: int = 9094  # the SuperNode's local Runtime API port (one per client on a machine)
    max_retries: int | None = None  # reconnect attempts before giving up (None = forever)
    max_wait_time: float | None = None  # seconds of reconnecting before giving up (None = forever)
    poll_interval: float = DEFAULT_POLL_SECONDS  # seconds between the SuperNode's pulls while idle (Flower's own: 3)
    threads: int = 0  # torch threads of the ClientApp (0 = all cores)
    dp_min_noise: float = 0.0  # privacy policy: train only with local DP-SGD at this noise or more (0 = none)
    epsilon_budget: float = 0.0  # privacy policy: never spend more epsilon than this on this data (0 = none)
    delta: float = 0.0  # privacy policy: account at this delta or less (0 = the round's)
    privacy_ledger: str | None = None  # the device's accountant file (default: one per data path under the state folder)

    def validate(self) -> EdgeSettings:
        host, sep, port = self.coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--coordinator '{self.coordinator}' must be HOST:PORT")
        if not Path(self.data).exists():
            raise FileNotFoundError(f"--data '{self.data}' does not exist")
        for option, path in (("--root-certificates", self.root_certificates), ("--key", self.key), ("--artifact-public-key", self.artifact_public_key)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{option} '{path}' does not exist")
        if self.artifact_public_key:
            from emulator.keys import load_public_key

            load_public_key(self.artifact_public_key)  # an Ed25519 key, or a one-line PackageError now rather than a declined round later
        if self.key and self.insecure:
            raise ValueError("--key (node authentication) needs TLS; drop --insecure")
        check_poll(self.poll_interval)
        if self.memory_gb < 0:
            raise ValueError(f"--memory-gb must be non-negative, got {self.memory_gb}")
        from finetune.device import resolve_device

        resolve_device(self.device)  # a device this machine lacks: one line now, not a declined round later (DeviceError)
        for option, value in (("--dp-min-noise", self.dp_min_noise), ("--epsilon-budget", self.epsilon_budget), ("--delta", self.delta)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{option} must be a finite number >= 0, got {value}")
        if self.delta >= 1:
            raise ValueError(f"--delta must be below 1, got {self.delta}")
        return self

    def policy(self) -> DevicePolicy:
        return DevicePolicy(self.dp_min_noise, self.epsilon_budget, self.delta)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


STATE_DIR = Path.home() / ".cache" / "fedsite" / "client-state"  # error-feedback residuals, privacy ledgers


def default_ledger(data: str) -> Path:
    """One privacy ledger per dataset on the device: what its data has spent, across runs."""
    digest = hashlib.sha256(str(Path(data).resolve()).encode()).hexdigest()[:16]
    return STATE_DIR / f"privacy-{digest}.json"


def node_config(settings: EdgeSettings) -> str:
    """The SuperNode's `--node-config`: the data path, the device profile and its privacy policy, as TOML values."""
    values = {
        "data-path": str(Path(settings.data).resolve()),
        "memory-gb": float(settings.memory_gb),
        "holds-backbone": settings.holds_backbone,
        "quantized": settings.quantized,
        "device": settings.device,
        "state-dir": str(STATE_DIR),
        LEDGER_KEY: str(Path(settings.privacy_ledger).expanduser().resolve()) if settings.privacy_ledger else str(default_ledger(settings.data)),
        **settings.policy().node_config(),
    }
    if settings.profile:
        values["profile"] = settings.profile
    if settings.root_certificates and not settings.insecure:  # artifact fetches verify the coordinator with it
        values["root-certificates"] = str(Path(settings.root_certificates).resolve())
    if settings.artifact_public_key:  # emulator packages verify against this key only
        values["artifact-public-key"] = str(Path(settings.artifact_public_key).resolve())
    if settings.key:  # artifact fetches are signed with the enrolment key
        values["artifact-auth-key"] = str(Path(settings.key).resolve())
    return " ".join(f"{key}={_toml_value(value)}" for key, value in values.items())


def supernode_command(settings: EdgeSettings, executor_secret: str | Path | None = None) -> list[str]:
    """Flower's SuperNode, through `client.supernode` so that it polls every `poll_interval`;
    with `executor_secret` (a file in the client's private folder) its ClientApp tasks run in
    the long-lived executor (client/executor.py) instead of a process each."""
    flower_args = ["--superlink", settings.coordinator, "--node-config", node_config(settings), "--port", str(settings.runtime_port)]
    if settings.insecure:
        flower_args.append("--insecure")
    elif settings.root_certificates:
        flower_args += ["--root-certificates", str(Path(settings.root_certificates).resolve())]
    if settings.key:
        flower_args += ["--auth-supernode-private-key", str(Path(settings.key).resolve())]
    if settings.max_retries is not None:
        flower_args += ["--max-retries", str(settings.max_retries)]
    if settings.max_wait_time is not None:
        flower_args += ["--max-wait-time", str(settings.max_wait_time)]
    return supernode.command(settings.poll_interval, flower_args, None if executor_secret is None else str(executor_secret))


def client_home(runtime_port: int, home: str | Path | None = None) -> Path:
    """Flower's folder (FLWR_HOME) for one client: `home`, else its own folder per runtime port
    under $FLWR_HOME (default ~/.flwr). Each SuperNode installs the run's app into its home on the
    first round, and Flower's install is not safe against a second SuperNode installing into the
    same folder at the same moment (one finds a half-copied app and its round fails)."""
    if home is not None:
        return Path(home).expanduser()
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser() / f"fedsite-client-{runtime_port}"


def with_worker(command: list[str], files: WorkerFiles, owner_pid: int) -> list[str]:
    """The SuperNode command with the worker's socket and owner added to its `--node-config`:
    the ClientApp then forwards every message to the warm worker (client/client_app.py)."""
    extra = f"{SOCKET_KEY}={_toml_value(str(files.socket))} {OWNER_KEY}={int(owner_pid)}"
    if "--node-config" not in command:
        return [*command, "--node-config", extra]
    at = command.index("--node-config") + 1
    return [*command[:at], f"{command[at]} {extra}", *command[at + 1 :]]


class EdgeWorker:
    """The warm worker this client starts (owned by this process); a forwarder restarts it when
    it dies, and stopping stops a restarted one too."""

    def __init__(self, files: WorkerFiles, env: dict[str, str]):
        self.files, self._stopping = files, threading.Event()
        self.proc = start_worker(files, os.getpid(), env=env, detach=False)
        log.info("[fedsite] edge client: warm worker pid %d on %s (log %s)", self.proc.pid, files.socket, files.log)
        threading.Thread(target=self._report, name="worker-exit", daemon=True).start()

    def _report(self) -> None:  # reaps it at once, so that its socket and lock are gone with it
        code = self.proc.wait()
        if not self._stopping.is_set():
            log.info("[fedsite] edge client: warm worker pid %d exited with code %d (the next message starts a new one)", self.proc.pid, code)

    def stop(self, grace: float = 10.0) -> None:
        self._stopping.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        stop_worker_at(self.files)


def run_edge(settings: EdgeSettings, home: str | Path | None = None) -> int:
    """Run the SuperNode in the foreground beside a warm worker; restart the SuperNode with
    backoff when it exits on an error.

    A SuperNode gives up when the coordinator answers but does not admit it (not enrolled yet,
    or a restarted coordinator still starting); it is started again until `max_retries`
    restarts or `max_wait_time` seconds are used up (both unlimited by default). The worker
    (client/worker.py) lives in `<client home>/worker/`, owner-only; it ends with this process.
    """
    settings.validate()
    flower_home = client_home(settings.runtime_port, home)
    env, files = flower_env(flower_home, settings.threads), worker_files(flower_home / "worker")
    private_folder(files.folder)
    command = with_worker(supernode_command(settings, files.folder / EXECUTOR_SECRET), files, os.getpid())
    log.info("[fedsite] edge client: data %s -> coordinator %s (%s)", settings.data, settings.coordinator, "no TLS" if settings.insecure else "TLS")
    proc: subprocess.Popen | None = None
    worker: EdgeWorker | None = None

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    started, restarts = time.monotonic(), 0
    try:
        worker = EdgeWorker(files, env)
        while True:
            proc = subprocess.Popen(command, env=env)
            code = proc.wait()
            stop_process_tree(proc)  # its SuperExec and any ClientApp left running
            if code == 0:
                return 0
            restarts += 1
            out_of_tries = settings.max_retries is not None and restarts > settings.max_retries
            if out_of_tries or (settings.max_wait_time is not None and time.monotonic() - started > settings.max_wait_time):
                log.error("[fedsite] edge client: refused by the coordinator %s or unreachable (SuperNode exit code %d); giving up", settings.coordinator, code)
                return code
            delay = min(RESTART_DELAY_MAX, 2.0**restarts)
            log.warning("[fedsite] edge client: SuperNode exited with code %d (not admitted or coordinator unreachable); restarting in %.0fs", code, delay)
            time.sleep(delay)
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc is not None:
            stop_process_tree(proc)
        if worker is not None:
            worker.stop()
