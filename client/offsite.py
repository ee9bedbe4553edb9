"""Offsite clients: train the adapter against the coordinator's emulator, never the backbone.

The round message names a signed emulator package (a local folder in simulation, or an
artifact fetched by content hash) and the coordinator's public key. The package is
verified before anything in it is loaded, then kept in memory for later rounds, like the
backbone of LoRA clients (`finetune.cache`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.artifacts import fetch_ref
from emulator.keys import PackageError
from emulator.layers import LayerMap
from emulator.offsite import trainable_model
from emulator.package import load_package
from finetune.lora import LoraSettings
from protos.artifacts import ArtifactError, ArtifactRef

ARTIFACT_SCHEME = "fedsite-artifact://"

# ConfigRecord keys of an offsite client's round message
KIND_KEY = "package-kind"
PACKAGE_KEY = "emulator-package"
PUBLIC_KEY_KEY = "emulator-public-key"
MODE_KEY = "offsite-train"
# node config key of a deployed client: the coordinator's public key it trusts
PINNED_KEY_NODE = "coordinator-public-key"


@dataclass(frozen=True)
class OffsiteSpec:
    """Which emulator to train and how, as the coordinator sent it."""

    package: str
    public_key_pem: str
    mode: str

    @classmethod
    def from_config(cls, values: dict, pinned_key_pem: str | None = None) -> OffsiteSpec:
        """Read the spec from a round's config; a client with a pinned key refuses any other signer."""
        missing = [key for key in (PACKAGE_KEY, PUBLIC_KEY_KEY, MODE_KEY) if not values.get(key)]
        if missing:
            raise PackageError(f"offsite client: round message lacks '{missing[0]}'")
        key = str(values[PUBLIC_KEY_KEY])
        if pinned_key_pem is not None and pinned_key_pem.strip() != key.strip():
            raise PackageError("offsite client: the package is signed by a key other than the pinned coordinator key")
        return cls(str(values[PACKAGE_KEY]), key, str(values[MODE_KEY]))


def offsite_spec(values: Mapping[str, Any], node_config: Mapping[str, Any]) -> OffsiteSpec | None:
    """The spec of a round message for an emulator client, else None (a LoRA client).

    A deployed client pins the coordinator's key with node config `coordinator-public-key`
    (a PEM file); a package signed by any other key is refused.
    """
    if values.get(KIND_KEY) != "emulator":
        return None
    pinned = node_config.get(PINNED_KEY_NODE)
    pinned_pem = Path(str(pinned)).expanduser().read_text() if pinned else None
    return OffsiteSpec.from_config(dict(values), pinned_pem)


def offsite_model(
    spec: OffsiteSpec, settings: LoraSettings, seed: int, node_config: Mapping[str, Any] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LayerMap]:
    """The verified emulator made trainable in `spec.mode`, once per process and package.

    `spec.package` is a folder (simulation: the coordinator's disk) or a `fedsite-artifact://`
    reference, fetched once into the client's cache (node config `artifact-cache`, TLS with
    `root-certificates`) and verified there.
    """
    public_key = _public_key(spec.public_key_pem)
    package = spec.package
    if package.startswith(ARTIFACT_SCHEME):
        node_config = node_config or {}
        cache = Path(str(node_config.get("artifact-cache") or Path.home() / ".cache" / "fedsite" / "artifacts")).expanduser()
        root_cert = node_config.get("root-certificates") or None
        try:
            package = str(fetch_ref(ArtifactRef.parse(package), cache, public_key, root_cert))
        except ArtifactError as err:
            raise PackageError(f"offsite client: {err}") from None
    return _load(package, spec.public_key_pem, spec.mode, settings, seed)


def _public_key(pem: str) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as err:
        raise PackageError(f"offsite client: the coordinator's public key is not a PEM key: {str(err).splitlines()[0]}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PackageError(f"offsite client: the coordinator's key is {type(key).__name__}, expected Ed25519")
    return key


@lru_cache(maxsize=2)
def _load(package: str, public_key_pem: str, mode: str, settings: LoraSettings, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LayerMap]:
    emulator, tokenizer, layer_map, _ = load_package(Path(package), _public_key(public_key_pem))
    return trainable_model(emulator, layer_map, mode, settings, seed), tokenizer, layer_map
