"""An offsite client gets its emulator by reference: fetched over the artifact service, verified, loaded.

A deployed client trusts only its node config: the pinned artifact key, the CA, its enrolment key."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.edge import EdgeSettings, node_config
from client.offsite import OffsiteSpec, offsite_model, offsite_spec
from coordinator.artifacts import ArtifactStore, serve_artifacts
from coordinator.certs import write_certs, write_node_key
from coordinator.offsite import prepare_offsite
from emulator.keys import PackageError, generate_signing_key, load_signing_key, public_key_pem
from finetune.config import FedsiteConfig


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny run's emulator package published in an artifact store and served on loopback."""
    root = tmp_path_factory.mktemp("coordinator")
    config = FedsiteConfig(model="tiny", out=str(root / "run"), emulator_share=1.0)
    track = prepare_offsite(config)
    store = ArtifactStore(root / "artifacts", load_signing_key(root / "run" / "keys" / "signing_key.pem"))
    item = store.add(track.package)
    server = serve_artifacts(store, "127.0.0.1:0")
    yield config, track, store.ref(item.sha256, server.address)
    server.stop()


def test_package_reference_is_fetched_once_and_loaded(served, tmp_path):
    config, track, ref = served
    values = {**track.client_config(), "emulator-package": str(ref)}
    spec = offsite_spec(values, {})
    node = {"artifact-cache": str(tmp_path / "cache")}
    model, _, layer_map = offsite_model(spec, config.offsite_lora_settings(), config.seed, node)
    assert layer_map == track.layer_map and any(p.requires_grad for p in model.parameters())
    assert (tmp_path / "cache" / ref.sha256 / "manifest.sig").is_file()  # cached, verified copy


def test_reference_signed_by_another_key_is_refused(served, tmp_path):
    config, track, ref = served
    other = public_key_pem(generate_signing_key(tmp_path / "other.pem").public_key()).decode()
    spec = OffsiteSpec(str(ref), other, "lora")
    with pytest.raises(PackageError, match="offsite client"):
        offsite_model(spec, config.offsite_lora_settings(), config.seed, {"artifact-cache": str(tmp_path / "cache")})
    assert not (tmp_path / "cache" / ref.sha256).exists()


def test_lora_clients_get_no_spec_and_pinned_key_is_enforced(served, tmp_path):
    _, track, _ = served
    assert offsite_spec({"package-kind": "lora"}, {}) is None
    pinned = tmp_path / "coordinator.pem"
    pinned.write_bytes(public_key_pem(generate_signing_key(tmp_path / "x.pem").public_key()))
    with pytest.raises(PackageError, match="pinned"):
        offsite_spec(track.client_config(), {"artifact-public-key": str(pinned)})


def test_with_an_artifact_url_the_round_message_carries_a_reference(tmp_path):
    config = FedsiteConfig(model="tiny", out=str(tmp_path / "run"), emulator_share=1.0, artifact_url="127.0.0.1:0")
    track = prepare_offsite(config)
    reference = track.client_config()["emulator-package"]
    assert reference.startswith("fedsite-artifact://127.0.0.1:0/folder/")
    assert (tmp_path / "run" / "artifacts" / reference.rsplit("/", 1)[1]).is_file()  # published, content-addressed


# ------------------------------------------------------------------ deployed clients: pinned key, TLS, signed fetches


@pytest.fixture(scope="module")
def deployed(served, tmp_path_factory):
    """The same store served with TLS to enrolled clients only, and one enrolled client's files."""
    config, track, ref = served
    root = tmp_path_factory.mktemp("deployed")
    tls = write_certs(root / "certs")
    client_key, client_pub = write_node_key(root / "enrolled", "client-1")
    store = ArtifactStore(Path(config.out).parent / "artifacts", load_signing_key(Path(config.out) / "keys" / "signing_key.pem"))  # the store `served` publishes into
    server = serve_artifacts(store, "127.0.0.1:0", tls.server_cert, tls.server_key, enrolled=[client_pub])
    data = root / "data.jsonl"
    data.write_text('{"instruction": "i", "input": "", "output": "o"}\n')
    settings = EdgeSettings("127.0.0.1:9092", str(data), str(tls.ca_cert), str(client_key), artifact_public_key=str(Path(config.out) / "keys" / "public_key.pem"))
    yield config, track, store.ref(ref.sha256, f"localhost:{server.port}"), settings, server
    server.stop()


def _node(settings: EdgeSettings, cache) -> dict:
    """What the ClientApp sees: the node config `fedsite client` gives its SuperNode, through Flower's parser."""
    from flwr.common.config import parse_config_args

    return {**parse_config_args([node_config(settings.validate())]), "artifact-cache": str(cache)}


def test_node_config_names_the_ca_pinned_key_and_enrolment_key(deployed):
    _, _, _, settings, _ = deployed
    node = _node(settings, "/unused")
    assert node["root-certificates"] == str(Path(settings.root_certificates).resolve())
    assert node["artifact-public-key"] == str(Path(settings.artifact_public_key).resolve())
    assert node["artifact-auth-key"] == str(Path(settings.key).resolve())  # a path: the key stays in its owner-only file
    insecure = EdgeSettings(settings.coordinator, settings.data, insecure=True)
    assert not {"root-certificates", "artifact-public-key", "artifact-auth-key"} & set(_node(insecure, "/unused"))


def test_deployed_client_fetches_over_tls_signed_and_verifies_with_the_pinned_key(deployed, tmp_path):
    config, track, ref, settings, server = deployed
    admitted = server.auth.admitted
    values = {**track.client_config(), "emulator-package": str(ref)}
    del values["emulator-public-key"]  # the message's key plays no part
    node = _node(settings, tmp_path / "cache")
    spec = offsite_spec(values, node)
    assert spec.public_key_pem == Path(settings.artifact_public_key).read_text()
    _, _, layer_map = offsite_model(spec, config.offsite_lora_settings(), config.seed, node)
    assert layer_map == track.layer_map and (tmp_path / "cache" / ref.sha256 / "manifest.sig").is_file()
    assert server.auth.admitted == admitted + 2  # Stat and Fetch, both signed by the enrolled key


def test_a_fetch_without_the_enrolment_key_is_refused(deployed, tmp_path):
    config, track, ref, settings, server = deployed
    node = {k: v for k, v in _node(settings, tmp_path / "cache").items() if k != "artifact-auth-key"}
    spec = offsite_spec({**track.client_config(), "emulator-package": str(ref)}, node)
    with pytest.raises(PackageError, match="UNAUTHENTICATED: artifact service: unauthenticated request"):
        offsite_model(spec, config.offsite_lora_settings(), config.seed + 1, node)
    assert not (tmp_path / "cache" / ref.sha256).exists()


def test_deployed_client_without_a_pinned_key_declines_and_a_message_naming_another_signer_is_refused(deployed, tmp_path):
    _, track, ref, settings, server = deployed
    values = {**track.client_config(), "emulator-package": str(ref)}
    unpinned = {k: v for k, v in _node(settings, tmp_path / "cache").items() if k != "artifact-public-key"}
    with pytest.raises(PackageError, match="no pinned artifact key .*--artifact-public-key") as err:
        offsite_spec(values, unpinned)
    assert "\n" not in str(err.value)
    assert offsite_spec(values, {}).public_key_pem == track.public_key_pem  # a simulated client: the message's key, as before
    attacker = public_key_pem(generate_signing_key(tmp_path / "attacker.pem").public_key()).decode()
    with pytest.raises(PackageError, match="signer other than the pinned artifact key"):
        offsite_spec({**values, "emulator-public-key": attacker}, _node(settings, tmp_path / "cache"))


def test_an_artifact_public_key_that_is_not_ed25519_is_a_one_line_startup_error(deployed, tmp_path):
    _, _, _, settings, _ = deployed
    bogus = tmp_path / "not-a-key.pem"
    bogus.write_text("hello")
    with pytest.raises(PackageError, match="not-a-key.pem: not an Ed25519 public key") as err:
        EdgeSettings(settings.coordinator, settings.data, artifact_public_key=str(bogus)).validate()
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="--artifact-public-key '/nonexistent.pem' does not exist"):
        EdgeSettings(settings.coordinator, settings.data, artifact_public_key="/nonexistent.pem").validate()
