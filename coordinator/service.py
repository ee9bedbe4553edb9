"""The coordinator service: Flower's SuperLink plus the run's ServerApp, through Flower's own commands.

`run_coordinator` starts `flower-superlink` (TLS from certificate files, SuperNode
authentication on), enrols the clients' public keys with `flwr supernode register`, submits
the Fedsite app with `flwr run` and streams its log until the run ends. Flower 1.41 serves the
Fleet, Control and Runtime APIs on one HTTPS port. The SuperLink keeps its state (enrolled
nodes) in a database in the state folder, so a restarted coordinator knows its clients; the
ServerApp resumes from the checkpoint in the results folder (coordinator/checkpoint.py).

Everything Flower writes (its FLWR_HOME with the SuperLink connection, the staged app, the
SuperLink database and log) lives in the state folder, never in the user's ~/.flwr.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import tomli_w

from finetune.processes import flower_env, flower_tool, stop_process_tree
from coordinator.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from coordinator.checkpoint import load_checkpoint
from finetune.config import FedsiteConfig

log = logging.getLogger("fedsite.coordinator")

CONNECTION = "fedsite"  # the SuperLink connection's name in the service's FLWR_HOME
ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGES = ("fedsite", "finetune", "coordinator", "client", "emulator", "protos", "aggregation", "simulations")
STARTUP_SECONDS = 60.0


class ServiceError(RuntimeError):
    """Flower's SuperLink or CLI failed; the message says which step and where its log is."""


@dataclass
class ServiceSettings:
    address: str = "0.0.0.0:9092"  # HOST:PORT the SuperLink listens on (all of Flower's APIs)
    certs: str | None = None  # folder with ca.crt, server.pem, server.key (`fedsite certs --out DIR`)
    insecure: bool = False  # no TLS and so no node authentication: local tests only
    auth: bool = True  # only enrolled SuperNodes may join
    enroll: list[str] = field(default_factory=list)  # client public keys (.pub files or folders of them)
    state: str | None = None  # Flower's home, database and logs; default OUT/service
    artifacts: str | None = None  # artifact store folder to serve (coordinator/artifacts.py); None = no artifact service
    artifact_key: str | None = None  # the store's Ed25519 signing key (PEM)
    artifact_address: str = "0.0.0.0:9093"  # HOST:PORT of the artifact service (same TLS certificate)

    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--address '{self.address}' must be HOST:PORT")
        return host.strip("[]"), int(port)

    def cert_files(self) -> tuple[Path, Path, Path] | None:
        """(CA, certificate, key), checked; None without TLS."""
        if self.insecure:
            return None
        if not self.certs:
            raise ValueError("TLS is on by default: pass --certs DIR (make test ones with `fedsite certs --out DIR`) or --insecure")
        files = tuple(Path(self.certs).resolve() / name for name in (CA_CERT, SERVER_CERT, SERVER_KEY))
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"--certs: '{path}' does not exist (expected {CA_CERT}, {SERVER_CERT}, {SERVER_KEY})")
        return files  # type: ignore[return-value]

    def public_keys(self) -> list[Path]:
        keys: list[Path] = []
        for item in map(Path, self.enroll):
            if item.is_dir():
                keys += sorted(item.glob("*.pub"))
            elif item.is_file():
                keys.append(item)
            else:
                raise FileNotFoundError(f"--enroll: '{item}' does not exist")
        return [k.resolve() for k in keys]

    def validate(self) -> ServiceSettings:
        self.host_port()
        self.cert_files()
        if self.auth and self.insecure:
            raise ValueError("node authentication needs TLS: drop --insecure or pass --no-auth")
        if self.artifacts and not (self.artifact_key and Path(self.artifact_key).is_file()):
            raise FileNotFoundError(f"--artifacts needs --artifact-key, the store's Ed25519 signing key (got {self.artifact_key!r})")
        self.public_keys()
        return self


def stage_app(dest: Path) -> Path:
    """Copy the Flower app (pyproject.toml and the packages' sources) for `flwr run` to bundle.

    The copy's pyproject.toml has no `[tool.flwr.federations]`: `flwr run` would otherwise move
    that section into FLWR_HOME and rewrite the file.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for package in APP_PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    text = (ROOT / "pyproject.toml").read_text()
    (dest / "pyproject.toml").write_text(re.split(r"(?m)^.*\n?(?=\[tool\.flwr\.federations)", text, maxsplit=1)[0])
    return dest


def write_connection(home: Path, address: str, ca: Path | None) -> None:
    """The SuperLink connection `flwr` uses, in the service's own FLWR_HOME."""
    connection: dict[str, object] = {"address": address}
    connection.update({"root-certificates": str(ca)} if ca else {"insecure": True})
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))


def wait_until_ready(proc: subprocess.Popen, url: str, ca: Path | None, log_file: Path) -> None:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else False
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
        try:
            if httpx.get(f"{url}/health", verify=verify, timeout=2.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServiceError(f"flower-superlink did not answer within {STARTUP_SECONDS:.0f}s; see {log_file}")


def flwr(args: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([flower_tool("flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True)


def last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {done.returncode}"


def enroll(keys: Sequence[Path], env: dict[str, str]) -> None:
    """Register each public key with the SuperLink; a key enrolled by an earlier start is fine."""
    for key in keys:
        done = flwr(["supernode", "register", str(key), CONNECTION, "--format", "json"], env)
        if done.returncode == 0:
            log.info("[fedsite] enrolled client key %s", key.name)
        elif "already" in (done.stdout + done.stderr).lower():
            log.info("[fedsite] client key %s was already enrolled", key.name)
        else:
            raise ServiceError(f"could not enrol '{key}': {last_line(done)}")


def submit_run(app: Path, run_config: Path, env: dict[str, str]) -> int:
    done = flwr(["run", str(app), CONNECTION, "--run-config", str(run_config), "--format", "json"], env, cwd=app)
    try:
        return int(json.loads(done.stdout)["run-id"])
    except (ValueError, KeyError):
        raise ServiceError(f"`flwr run` failed: {last_line(done)}") from None


def run_status(run_id: int, env: dict[str, str]) -> str:
    done = flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env)
    try:
        return str(json.loads(done.stdout)["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        return "unknown"


def superlink_command(settings: ServiceSettings, database: Path, log_file: Path) -> list[str]:
    host, port = settings.host_port()
    command = [flower_tool("flower-superlink"), "--host", host, "--port", str(port), "--database", str(database), "--log-file", str(log_file)]
    command.append("--disable-runtime-dependency-installation")  # the app's dependencies are installed here already
    files = settings.cert_files()
    if files is None:
        command.append("--insecure")
    else:
        ca, cert, key = files
        command += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    if settings.auth:
        command.append("--enable-supernode-auth")
    return command


def run_coordinator(config: FedsiteConfig, settings: ServiceSettings) -> int:
    """Serve one run: SuperLink up, clients enrolled, run submitted and followed to its end."""
    settings.validate()
    config = config.replace(out=str(Path(config.out).resolve())).validate()  # the ServerApp runs elsewhere
    load_checkpoint(config)  # a checkpoint of another configuration fails here, in one line, not in the ServerApp
    state = Path(settings.state or Path(config.out) / "service").resolve()
    home, log_file = state / "flwr-home", state / "superlink.log"
    env = flower_env(home)
    host, port = settings.host_port()
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    files = settings.cert_files()
    write_connection(home, f"{local}:{port}", files[0] if files else None)
    app = stage_app(state / "app")
    run_config = state / "run-config.toml"
    run_config.write_text(tomli_w.dumps(config.to_flat()))

    log.info("[fedsite] coordinator on %s (%s, %s); state in %s", settings.address, "TLS" if files else "no TLS", "enrolled clients only" if settings.auth else "any client", state)
    superlink = subprocess.Popen(superlink_command(settings, state / "superlink.db", log_file), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stream: subprocess.Popen | None = None
    artifact_server = None

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        artifact_server = start_artifact_service(settings)
        wait_until_ready(superlink, f"{'https' if files else 'http'}://{local}:{port}", files[0] if files else None, log_file)
        enroll(settings.public_keys(), env)
        run_id = submit_run(app, run_config, env)
        log.info("[fedsite] run %d submitted: %d rounds on '%s', results in %s", run_id, config.num_server_rounds, config.model, config.out)
        stream = subprocess.Popen([flower_tool("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=env)
        stream.wait()
        status = run_status(run_id, env)
        while status in ("pending", "starting", "running"):  # the log stream can end early on a dropped connection
            time.sleep(2.0)
            status = run_status(run_id, env)
        log.info("[fedsite] run %d: %s", run_id, status)
        return 0 if status.endswith("completed") else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in (stream, superlink):
            if proc is not None:
                stop_process_tree(proc)
        if artifact_server is not None:
            artifact_server.stop(grace=1.0)


def start_artifact_service(settings: ServiceSettings):  # -> coordinator.artifacts.ArtifactServer | None
    """Serve the artifact store beside the SuperLink, with the same TLS certificate."""
    if not settings.artifacts:
        return None
    from coordinator.artifacts import ArtifactStore, serve_artifacts

    files = settings.cert_files()
    store = ArtifactStore(settings.artifacts, str(settings.artifact_key))
    return serve_artifacts(store, settings.artifact_address, *(files[1:] if files else (None, None)))
