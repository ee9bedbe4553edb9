"""An offsite client gets its emulator by reference: fetched over the artifact service, verified, loaded."""

from __future__ import annotations

import pytest

from client.offsite import OffsiteSpec, offsite_model, offsite_spec
from coordinator.artifacts import ArtifactStore, serve_artifacts
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
        offsite_spec(track.client_config(), {"coordinator-public-key": str(pinned)})


def test_with_an_artifact_url_the_round_message_carries_a_reference(tmp_path):
    config = FedsiteConfig(model="tiny", out=str(tmp_path / "run"), emulator_share=1.0, artifact_url="127.0.0.1:0")
    track = prepare_offsite(config)
    reference = track.client_config()["emulator-package"]
    assert reference.startswith("fedsite-artifact://127.0.0.1:0/folder/")
    assert (tmp_path / "run" / "artifacts" / reference.rsplit("/", 1)[1]).is_file()  # published, content-addressed
