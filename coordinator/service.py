"""The coordinator service: Flower's SuperLink plus the run's ServerApp, through Flower's own commands.

`run_coordinator` starts `flower-superlink` on loopback (TLS from certificate files, SuperNode
authentication on), puts the gateway (coordinator/gateway.py) on the public `--address`,
enrols the clients' public keys with `flwr supernode register` over the loopback Control API,
submits the Fedsite app with `flwr run` and streams its log until the run ends. Flower 1.41
serves the Fleet, Control and Runtime APIs on one port and its open-source Control API has no
authentication, so that port never leaves loopback: the gateway forwards the Fleet API alone,
and only someone with a shell on this host can submit runs or enrol keys. TLS is mandatory off
loopback. The SuperLink keeps its state (enrolled nodes) in a database in the state folder, so
a restarted coordinator knows its clients; the ServerApp resumes from the checkpoint in the
results folder (coordinator/checkpoint.py).

Everything Flower writes (its FLWR_HOME with the SuperLink connection, the staged app, the
SuperLink database and log) lives in the state folder, never in the user's ~/.flwr.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import tomli_w

from coordinator.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from coordinator.checkpoint import load_checkpoint
from coordinator.gateway import DEFAULT_MAX_BODY, start_gateway
from finetune.config import FedsiteConfig
from finetune.processes import flower_env, flower_tool, stop_process_tree
from finetune.serving import is_loopback

log = logging.getLogger("fedsite.coordinator")

CONNECTION = "fedsite"  # the SuperLink connection's name in the service's FLWR_HOME
LOOPBACK = "127.0.0.1"  # where the SuperLink (all of Flower's APIs) listens
ARTIFACT_PORT = 9093  # the artifact service's default port, on --address's host
ROOT = Path(__file__).resolve().parents[1]
APP_PACKAGES = ("fedsite", "finetune", "coordinator", "client", "emulator", "protos", "aggregation", "simulations")
STARTUP_SECONDS = 60.0


class ServiceError(RuntimeError):
    """Flower's SuperLink or CLI failed; the message says which step and where its log is."""


@dataclass
class ServiceSettings:
    address: str = "0.0.0.0:9092"  # public HOST:PORT of the gateway (Fleet API only); the SuperLink stays on loopback
    certs: str | None = None  # folder with ca.crt, server.pem, server.key (`fedsite certs --out DIR`)
    insecure: bool = False  # no TLS and so no node authentication: loopback tests only
    auth: bool = True  # only enrolled SuperNodes may join
    enroll: list[str] = field(default_factory=list)  # client public keys (.pub files or folders of them)
    state: str | None = None  # Flower's home, database and logs; default OUT/service
    artifacts: str | None = None  # artifact store folder to serve (coordinator/artifacts.py); None = no artifact service
    artifact_key: str | None = None  # the store's Ed25519 signing key (PEM); default: the run's, OUT/keys/signing_key.pem
    artifact_address: str | None = None  # HOST:PORT of the artifact service (same TLS certificate); default: --address's host, port 9093
    superlink_port: int = 0  # the SuperLink's port on 127.0.0.1 (0: a free one at each start)
    max_request_mb: float = DEFAULT_MAX_BODY / (1 << 20)  # largest request body the gateway passes on

    def host_port(self) -> tuple[str, int]:
        return _host_port(self.address, "--address")

    def artifact_host_port(self) -> tuple[str, int]:
        if self.artifact_address is None:
            return self.host_port()[0], ARTIFACT_PORT
        return _host_port(self.artifact_address, "--artifact-address", allow_zero=True)

    def artifact_listen(self) -> str:
        host, port = self.artifact_host_port()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

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
        host, port = self.host_port()
        self.cert_files()
        if self.auth and self.insecure:
            raise ValueError("node authentication needs TLS: drop --insecure or pass --no-auth")
        if self.artifact_key and not Path(self.artifact_key).is_file():
            raise FileNotFoundError(f"--artifact-key '{self.artifact_key}' does not exist (leave it out to use the run's key, OUT/keys/signing_key.pem)")
        keys = self.public_keys()
        public = [("--address", self.address, host)]
        if self.artifacts:
            public.append(("--artifact-address", self.artifact_listen(), self.artifact_host_port()[0]))
            if self.auth and not keys:
                raise ValueError("--artifacts admits enrolled clients only: pass --enroll with their public keys")
        for option, address, where in public:
            if is_loopback(where):
                continue
            if self.insecure:
                raise ValueError(f"--insecure is for loopback only: TLS is mandatory on {option} '{address}' (pass --certs DIR)")
            if not self.auth:
                raise ValueError(f"--no-auth is for loopback only: {option} '{address}' would admit any client (enrol them with --enroll)")
        if not 0 <= self.superlink_port < 65536 or (self.superlink_port == port and host in ("0.0.0.0", "::", LOOPBACK, "localhost")):
            raise ValueError(f"--superlink-port {self.superlink_port} must be a free port on 127.0.0.1 other than --address's")
        if not self.max_request_mb > 0:
            raise ValueError(f"--max-request-mb must be positive, got {self.max_request_mb}")
        return self


def _host_port(value: str, option: str, allow_zero: bool = False) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if allow_zero else 1) <= int(port) < 65536:
        raise ValueError(f"{option} '{value}' must be HOST:PORT")
    return host.strip("[]"), int(port)


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


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


def superlink_command(settings: ServiceSettings, database: Path, log_file: Path, port: int) -> list[str]:
    """`flower-superlink` on 127.0.0.1:port only: its Control and Runtime APIs never leave this host."""
    command = [flower_tool("flower-superlink"), "--host", LOOPBACK, "--port", str(port), "--database", str(database), "--log-file", str(log_file)]
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


def run_signing_key(config: FedsiteConfig) -> Path:
    """The Ed25519 key the run's ServerApp signs its emulator package with (coordinator/offsite.py)."""
    if config.emulator_package:
        return Path(config.emulator_package).expanduser().resolve().parent / "keys" / "signing_key.pem"
    return Path(config.out).resolve() / "keys" / "signing_key.pem"


def artifact_signing_key(settings: ServiceSettings, config: FedsiteConfig) -> Path:
    """The artifact store's key: the run's own, made here on a first start (owner-only, its public
    half `public_key.pem` beside it, what clients pin with `--artifact-public-key`)."""
    from emulator.keys import generate_signing_key, key_id, load_signing_key, public_key_pem

    run_key = run_signing_key(config)
    if settings.artifact_key and Path(settings.artifact_key).resolve() != run_key:
        same = run_key.is_file() and key_id(load_signing_key(run_key).public_key()) == key_id(load_signing_key(settings.artifact_key).public_key())
        if not same:
            raise ValueError(f"--artifact-key '{settings.artifact_key}' is not the key this run signs its emulator packages with ({run_key}): pass that one or leave --artifact-key out")
        return Path(settings.artifact_key).resolve()
    if not run_key.is_file():
        if config.emulator_package:
            raise FileNotFoundError(f"emulator-package: no signing key at {run_key} (build the package with `fedsite emulator build`)")
        public = generate_signing_key(run_key).public_key()
        run_key.with_name("public_key.pem").write_bytes(public_key_pem(public))
        log.info("[fedsite] made the run's artifact signing key %s", run_key)
    return run_key


def run_coordinator(config: FedsiteConfig, settings: ServiceSettings) -> int:
    """Serve one run: SuperLink up on loopback, gateway on --address, clients enrolled, run submitted and followed to its end."""
    settings.validate()
    paths = {"out": str(Path(config.out).resolve())}
    if config.emulator_package:
        paths["emulator_package"] = str(Path(config.emulator_package).expanduser().resolve())
    config = config.replace(**paths).validate()  # the ServerApp runs in another folder
    load_checkpoint(config)  # a checkpoint of another configuration fails here, in one line, not in the ServerApp
    artifact_key = artifact_signing_key(settings, config) if settings.artifacts else None
    state = Path(settings.state or Path(config.out) / "service").resolve()
    home, log_file = state / "flwr-home", state / "superlink.log"
    env = flower_env(home)
    host, port = settings.host_port()
    local = LOOPBACK if host in ("0.0.0.0", "::", "") else host
    internal = settings.superlink_port or free_loopback_port()
    files = settings.cert_files()
    scheme = "https" if files else "http"
    write_connection(home, f"{LOOPBACK}:{internal}", files[0] if files else None)  # `flwr` talks to the loopback SuperLink
    app = stage_app(state / "app")
    run_config = state / "run-config.toml"
    run_config.write_text(tomli_w.dumps(config.to_flat()))

    log.info(
        "[fedsite] coordinator on %s (%s, %s; Fleet API only, SuperLink on %s:%d); state in %s",
        settings.address, "TLS" if files else "no TLS", "enrolled clients only" if settings.auth else "any client", LOOPBACK, internal, state,
    )  # fmt: skip
    superlink = subprocess.Popen(superlink_command(settings, state / "superlink.db", log_file, internal), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stream: subprocess.Popen | None = None
    gateway = artifact_server = None

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        try:
            gateway = start_gateway(
                host, port, f"{scheme}://{LOOPBACK}:{internal}", ca=files[0] if files else None, cert=files[1] if files else None,
                key=files[2] if files else None, max_body=int(settings.max_request_mb * (1 << 20)),
            )  # fmt: skip
            artifact_server = start_artifact_service(settings, artifact_key)
        except OSError as err:
            raise ServiceError(str(err)) from None
        wait_until_ready(superlink, f"{scheme}://{local}:{port}", files[0] if files else None, log_file)  # through the gateway
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
        if gateway is not None:
            gateway.stop()
        for proc in (stream, superlink):
            if proc is not None:
                stop_process_tree(proc)
        if artifact_server is not None:
            artifact_server.stop(grace=1.0)


def start_artifact_service(settings: ServiceSettings, signing_key: str | Path | None = None):  # -> ArtifactServer | None
    """Serve the artifact store with the same TLS certificate, to enrolled clients only (with node auth on)."""
    if not settings.artifacts:
        return None
    from coordinator.artifacts import ArtifactError, ArtifactStore, serve_artifacts

    files = settings.cert_files()
    store = ArtifactStore(settings.artifacts, str(signing_key or settings.artifact_key))
    enrolled = settings.public_keys() if settings.auth else None
    try:
        server = serve_artifacts(store, settings.artifact_listen(), *(files[1:] if files else (None, None)), enrolled=enrolled)
    except ArtifactError as err:
        raise ServiceError(f"artifact service: {err}") from None
    if signing_key is not None:
        public = Path(signing_key).with_name("public_key.pem") if Path(signing_key).name == "signing_key.pem" else Path(signing_key).with_suffix(".pub.pem")
        log.info("[fedsite] artifact service signs with %s: give clients `--artifact-public-key %s`", signing_key, public)
    return server
