"""The coordinator service's pieces without starting Flower: settings, certificates, the staged app,
the SuperLink command and connection, the CLI, and the strategy's log of clients that never replied."""

import logging
import subprocess
import tomllib

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from coordinator import service
from coordinator.certs import write_certs, write_node_key
from coordinator.results import RunRecorder
from coordinator.service import ServiceSettings, stage_app, superlink_command, write_connection
from coordinator.strategy import FedsiteStrategy
from fedsite.cli import build_parser, main
from finetune.config import FedsiteConfig


@pytest.fixture()
def certs(tmp_path):
    write_certs(tmp_path / "certs", ["coord.example.org", "10.1.2.3"])
    return tmp_path / "certs"


def test_certificates_chain_to_the_ca_and_name_the_hosts(certs):
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "coord.example.org"} <= set(names.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.1.2.3"} <= {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (certs / "server.key").stat().st_mode & 0o077 == 0  # private keys: owner only


def test_certificates_pass_openssl_verification(certs):
    done = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.pem")], capture_output=True, text=True)
    if done.returncode == 127:
        pytest.skip("no openssl binary")
    assert done.returncode == 0, done.stderr


def test_node_keys_are_the_format_flower_loads(tmp_path):
    private, public = write_node_key(tmp_path, "client-1")
    key = load_ssh_private_key(private.read_bytes(), None)
    assert key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs

    assert try_load_public_key(public)


@pytest.mark.parametrize(
    "settings, message",
    [
        (ServiceSettings(), "TLS is on by default: pass --certs DIR"),
        (ServiceSettings(address="9092", insecure=True, auth=False), "--address '9092' must be HOST:PORT"),
        (ServiceSettings(insecure=True), "node authentication needs TLS"),
        (ServiceSettings(certs="/nonexistent"), "does not exist"),
        (ServiceSettings(insecure=True, auth=False, enroll=["/nonexistent.pub"]), "--enroll: '/nonexistent.pub' does not exist"),
        (ServiceSettings(insecure=True, auth=False), "--insecure is for loopback only: TLS is mandatory on --address '0.0.0.0:9092'"),
        (ServiceSettings(address="10.1.2.3:9092", insecure=True, auth=False), "--insecure is for loopback only"),
        (ServiceSettings(address="[::]:9092", insecure=True, auth=False), "--insecure is for loopback only"),
        (ServiceSettings(address="127.0.0.1:9092", insecure=True, auth=False, artifacts="store", artifact_address="0.0.0.0:9093"), "TLS is mandatory on --artifact-address '0.0.0.0:9093'"),
        (ServiceSettings(address="127.0.0.1:9092", insecure=True, auth=False, superlink_port=9092), "--superlink-port 9092 must be a free port"),
        (ServiceSettings(address="127.0.0.1:9092", insecure=True, auth=False, max_request_mb=0), "--max-request-mb must be positive"),
    ],
)
def test_bad_service_settings_are_one_line_errors(settings, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        settings.validate()
    assert "\n" not in str(err.value)


def test_off_loopback_needs_tls_and_auth_on_loopback_anything_goes(certs, tmp_path):
    for address in ("127.0.0.1:9092", "localhost:9092", "[::1]:9092"):
        ServiceSettings(address=address, insecure=True, auth=False).validate()
    with pytest.raises(ValueError, match="--no-auth is for loopback only: --address '0.0.0.0:9092' would admit any client"):
        ServiceSettings(certs=str(certs), auth=False).validate()
    ServiceSettings(address="0.0.0.0:9092", certs=str(certs)).validate()  # TLS and enrolled clients: fine
    settings = ServiceSettings(address="10.1.2.3:9092", certs=str(certs))
    assert settings.artifact_listen() == "10.1.2.3:9093"  # the artifact service follows --address's host by default
    assert ServiceSettings(address="127.0.0.1:1", insecure=True, auth=False).artifact_listen() == "127.0.0.1:9093"


def test_cli_insecure_off_loopback_is_refused_in_one_line(tmp_path, capsys):
    assert main(["coordinator", "--insecure", "--no-auth", "--address", "0.0.0.0:9092", "--model", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedsite: error: --insecure is for loopback only: TLS is mandatory on --address '0.0.0.0:9092' (pass --certs DIR)"
    assert not (tmp_path / "service").exists()  # nothing was started


def test_superlink_command_binds_loopback_only_with_tls_auth_and_a_database(certs, tmp_path):
    command = superlink_command(ServiceSettings(address="0.0.0.0:9092", certs=str(certs)), tmp_path / "db", tmp_path / "log", 41234)
    args = {flag: command[i + 1] for i, flag in enumerate(command[:-1]) if flag.startswith("--") and not command[i + 1].startswith("--")}
    assert command[0].endswith("flower-superlink")
    assert (args["--host"], args["--port"]) == ("127.0.0.1", "41234")  # never the public address
    assert args["--ssl-ca-certfile"].endswith("ca.crt") and args["--ssl-certfile"].endswith("server.pem") and args["--ssl-keyfile"].endswith("server.key")
    assert args["--database"] == str(tmp_path / "db")
    assert "--enable-supernode-auth" in command and "--insecure" not in command


def test_enroll_takes_files_and_folders(tmp_path):
    write_node_key(tmp_path / "keys", "a")
    write_node_key(tmp_path / "keys", "b")
    _, single = write_node_key(tmp_path, "c")
    keys = ServiceSettings(insecure=True, auth=False, enroll=[str(tmp_path / "keys"), str(single)]).public_keys()
    assert [k.name for k in keys] == ["a.pub", "b.pub", "c.pub"]


def test_staged_app_has_no_federations_and_all_packages(tmp_path):
    app = stage_app(tmp_path / "app")
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert "federations" not in project["tool"]["flwr"]
    assert project["tool"]["flwr"]["app"]["components"]["serverapp"] == "simulations.server_app:app"
    assert all((app / package / "__init__.py").is_file() for package in service.APP_PACKAGES)
    assert not list(app.rglob("__pycache__"))


def test_connection_is_what_flwr_reads(tmp_path, monkeypatch, certs):
    write_connection(tmp_path / "home", "127.0.0.1:9092", certs / "ca.crt")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    from flwr.cli.flower_config import read_superlink_connection

    connection = read_superlink_connection(service.CONNECTION)
    assert connection.address == "127.0.0.1:9092" and connection.root_certificates == str(certs / "ca.crt")


def test_cli_help_of_the_service_commands(capsys):
    for command in ("certs", "coordinator", "client"):
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([command, "--help"])
        assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--certs" in text and "--enroll" in text and "--coordinator HOST:PORT" in text and "--data" in text and "--num-server-rounds" in text


def test_cli_certs_writes_ca_server_and_client_keys(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--clients", "2", "--host", "coord.local"]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"ca.crt", "ca.key", "server.pem", "server.key", "clients"}
    assert {p.name for p in (tmp_path / "clients").iterdir()} == {"client-1", "client-1.pub", "client-2", "client-2.pub"}


def test_cli_coordinator_without_certificates_is_a_one_line_error(tmp_path, capsys):
    assert main(["coordinator", "--model", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedsite: error: TLS is on by default") and "\n" not in err


def test_clients_that_never_reply_are_dropped_with_a_log_line(tmp_path, caplog, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from tests.coordinator.test_strategy import GLOBAL, full, reply

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1

    strategy = FedsiteStrategy(RunRecorder(tmp_path, FedsiteConfig()), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2)
    strategy._global = GLOBAL
    strategy._awaited = {2, 3, 9}  # node 9 was sampled, then killed or slower than round-timeout
    monkeypatch.setattr(logging.getLogger("fedsite.coordinator"), "propagate", True)  # restored as it was after the test
    caplog.set_level("WARNING", logger="fedsite.coordinator")
    arrays, _ = strategy.aggregate_train(1, [reply(2, full(1.0)), reply(3, full(3.0))])
    assert arrays is not None
    assert "no reply from 1 sampled client(s) within round-timeout, dropped: [9]" in caplog.text
    row = strategy.recorder.finish_round(1, {"eval_accuracy": 0.0})
    assert row["dropped"] == [9] and sorted(row["contributors"]) == [2, 3]
    assert np.isfinite(row["train_loss"])


def test_artifact_service_serves_the_store_over_the_same_tls_to_enrolled_keys(tmp_path, certs):
    from client.artifacts import FetchOptions, fetch_artifact
    from coordinator.artifacts import ArtifactStore
    from emulator.keys import generate_signing_key
    from protos.artifacts import ArtifactError

    key = tmp_path / "signing.pem"
    public = generate_signing_key(key).public_key()
    blob = tmp_path / "backbone.bin"
    blob.write_bytes(b"weights" * 1000)
    stored = ArtifactStore(tmp_path / "store", key).add(blob)
    client_key, client_pub = write_node_key(tmp_path / "enrolled", "client-1")
    with pytest.raises(ValueError, match="--artifacts admits enrolled clients only: pass --enroll"):
        ServiceSettings(certs=str(certs), artifacts=str(tmp_path / "store"), artifact_key=str(key)).validate()
    settings = ServiceSettings(certs=str(certs), enroll=[str(client_pub.parent)], artifacts=str(tmp_path / "store"), artifact_key=str(key), artifact_address="127.0.0.1:0").validate()
    server = service.start_artifact_service(settings)
    try:
        with pytest.raises(ArtifactError, match="UNAUTHENTICATED"):
            fetch_artifact(f"localhost:{server.port}", stored.sha256, tmp_path / "anon", public, certs / "ca.crt", options=FetchOptions(attempts=1))
        local = fetch_artifact(f"localhost:{server.port}", stored.sha256, tmp_path / "cache", public, certs / "ca.crt", auth_key=client_key)
        assert local.read_bytes() == blob.read_bytes()
    finally:
        server.stop()


def test_the_artifact_key_is_the_runs_own_made_once(tmp_path, certs):
    from emulator.keys import generate_signing_key, load_public_key, load_signing_key

    config = FedsiteConfig(model="tiny", out=str(tmp_path / "run"))
    settings = ServiceSettings(certs=str(certs), artifacts=str(tmp_path / "run" / "artifacts"))
    made = service.artifact_signing_key(settings, config)
    assert made == tmp_path / "run" / "keys" / "signing_key.pem" and made.stat().st_mode & 0o077 == 0
    public = load_public_key(made.with_name("public_key.pem"))  # what clients pin
    assert public.public_bytes_raw() == load_signing_key(made).public_key().public_bytes_raw()
    assert service.artifact_signing_key(settings, config) == made and load_public_key(made.with_name("public_key.pem")) == public  # reused
    generate_signing_key(tmp_path / "other.pem")
    settings.artifact_key = str(tmp_path / "other.pem")
    with pytest.raises(ValueError, match="is not the key this run signs its emulator packages with"):
        service.artifact_signing_key(settings, config)


def test_cli_coordinator_refuses_a_checkpoint_of_another_config_before_starting_flower(tmp_path, certs, capsys):
    from coordinator.checkpoint import save_checkpoint

    config = FedsiteConfig(model="tiny", out=str(tmp_path / "run"))
    save_checkpoint(RunRecorder(config.out, config), 1, {"a": np.zeros(2, np.float32)})
    assert main(["coordinator", "--certs", str(certs), "--model", "tiny", "--lora-rank", "4", "--out", config.out]) == 2
    err = capsys.readouterr().err.strip()
    assert "lora-rank=8 but this run has lora-rank=4" in err and "\n" not in err
    assert not (tmp_path / "run" / "service").exists()  # nothing was started
