"""Offsite clients: train the adapter against the coordinator's emulator, never the backbone.

The round message names a signed emulator package (a local folder in simulation, or an
artifact fetched by content hash) and the coordinator's public key. The package is
verified before anything in it is loaded, then kept in memory for later rounds, like the
backbone of LoRA clients (`finetune.cache`).

A deployed client (its node config names its own `data-path`) trusts only what its own
command line told it: the package must verify against the key pinned in its node config
(`artifact-public-key`, a PEM file); the key in the round message is ignored, and with no
pinned key the client declines emulator packages. It fetches over TLS verified against
`root-certificates` and signs its fetches with its enrolment key (`artifact-auth-key`). A
simulated client (no such node config) uses the round message's key, as before.

A round may carry a low-rank refresh of the emulator's middle (the coordinator's per-round
alignment, emulator/refresh.py) under `refresh/` in its arrays: the client verifies its
signature (same key as the package, bound to the package's manifest and the round) and applies
it to the emulator it holds; a bad or stale refresh declines the round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.artifacts import fetch_ref
from emulator.keys import PackageError
from emulator.layers import LayerMap
from emulator.offsite import base_model, trainable_model
from emulator.package import MANIFEST, load_package
from emulator.refresh import apply_refresh, manifest_digest, verify_refresh
from finetune.lora import LoraSettings
from protos.artifacts import ArtifactError, ArtifactRef

ARTIFACT_SCHEME = "fedsite-artifact://"

# ConfigRecord keys of an offsite client's round message
KIND_KEY = "package-kind"
PACKAGE_KEY = "emulator-package"
PUBLIC_KEY_KEY = "emulator-public-key"
MODE_KEY = "offsite-train"
REFRESH_PREFIX = "refresh/"  # arrays: the round's low-rank refresh of the emulator's middle
REFRESH_SIGNATURE_KEY, REFRESH_ROUND_KEY = "emulator-refresh-signature", "emulator-refresh-round"
# node config keys of a deployed client (client/edge.py writes them)
PINNED_KEY_NODE = "artifact-public-key"  # the coordinator's artifact-signing public key it trusts (PEM file)
AUTH_KEY_NODE = "artifact-auth-key"  # its enrolment private key, which signs artifact fetches
CA_NODE = "root-certificates"  # the coordinator's CA
DEVICE_NODE = "data-path"  # present on deployed clients only (finetune.sources.client_splits)


@dataclass(frozen=True)
class OffsiteSpec:
    """Which emulator to train and how, as the coordinator sent it."""

    package: str
    public_key_pem: str
    mode: str
    refresh_signature: str = ""  # hex Ed25519 signature of the round's refresh ("" = none)
    refresh_round: int = -1

    @classmethod
    def from_config(cls, values: dict, pinned_key_pem: str | None = None) -> OffsiteSpec:
        """Read the spec from a round's config. With a pinned key, the package is verified against
        that key only; the message's key is never used (a message naming another signer is
        declined up front, before any download)."""
        needed = (PACKAGE_KEY, MODE_KEY) if pinned_key_pem is not None else (PACKAGE_KEY, PUBLIC_KEY_KEY, MODE_KEY)
        missing = [key for key in needed if not values.get(key)]
        if missing:
            raise PackageError(f"offsite client: round message lacks '{missing[0]}'")
        try:
            refresh = (str(values.get(REFRESH_SIGNATURE_KEY) or ""), int(values.get(REFRESH_ROUND_KEY, -1)))
        except (TypeError, ValueError):
            raise PackageError(f"offsite client: '{REFRESH_ROUND_KEY}' is not a round number") from None
        if pinned_key_pem is None:
            return cls(str(values[PACKAGE_KEY]), str(values[PUBLIC_KEY_KEY]), str(values[MODE_KEY]), *refresh)
        pinned = _raw(_public_key(pinned_key_pem, "pinned artifact key"))
        claimed = str(values.get(PUBLIC_KEY_KEY) or "")
        if claimed and _raw(_public_key(claimed, "round message's key")) != pinned:
            raise PackageError("offsite client: the round names a signer other than the pinned artifact key; declined")
        return cls(str(values[PACKAGE_KEY]), pinned_key_pem, str(values[MODE_KEY]), *refresh)


def offsite_spec(values: Mapping[str, Any], node_config: Mapping[str, Any]) -> OffsiteSpec | None:
    """The spec of a round message for an emulator client, else None (a LoRA client).

    A deployed client verifies against the key pinned in its node config (`artifact-public-key`,
    a PEM file) and ignores the message's; without a pinned key it refuses (PackageError: the
    client declines the round).
    """
    if values.get(KIND_KEY) != "emulator":
        return None
    pinned = node_config.get(PINNED_KEY_NODE)
    if not pinned and DEVICE_NODE in node_config:
        raise PackageError("offsite client: no pinned artifact key (start `fedsite client` with --artifact-public-key PEM); emulator packages declined")
    pinned_pem = _read_pinned(str(pinned)) if pinned else None
    return OffsiteSpec.from_config(dict(values), pinned_pem)


def _read_pinned(path: str) -> str:
    try:
        pem = Path(path).expanduser().read_text()
    except OSError as err:
        raise PackageError(f"offsite client: pinned artifact key {path}: {err.strerror or err}") from None
    _public_key(pem, "pinned artifact key")  # an Ed25519 PEM key, or a one-line refusal
    return pem


def offsite_model(
    spec: OffsiteSpec, settings: LoraSettings, seed: int, node_config: Mapping[str, Any] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LayerMap]:
    """The verified emulator made trainable in `spec.mode`, once per process and package.

    `spec.package` is a folder (simulation: the coordinator's disk) or a `fedsite-artifact://`
    reference, fetched once into the client's cache (node config `artifact-cache`; TLS with
    `root-certificates`; signed with `artifact-auth-key`) and verified there.
    """
    public_key = _public_key(spec.public_key_pem)
    package = spec.package
    if package.startswith(ARTIFACT_SCHEME):
        node_config = node_config or {}
        cache = Path(str(node_config.get("artifact-cache") or Path.home() / ".cache" / "fedsite" / "artifacts")).expanduser()
        root_cert = node_config.get(CA_NODE) or None
        auth_key = node_config.get(AUTH_KEY_NODE) or None
        try:
            package = str(fetch_ref(ArtifactRef.parse(package), cache, public_key, root_cert, auth_key=auth_key))
        except ArtifactError as err:
            raise PackageError(f"offsite client: {err}") from None
    return _load(package, spec.public_key_pem, spec.mode, settings, seed)


def split_refresh(arrays: Mapping[str, Any]) -> tuple[dict, dict]:
    """(the adapter arrays, the refresh factors without their prefix) of a round's arrays."""
    rest = {k: v for k, v in arrays.items() if not k.startswith(REFRESH_PREFIX)}
    return rest, {k[len(REFRESH_PREFIX) :]: v for k, v in arrays.items() if k.startswith(REFRESH_PREFIX)}


def apply_round_refresh(model: PreTrainedModel, layer_map: LayerMap, spec: OffsiteSpec, refresh: Mapping[str, Any]) -> None:
    """Verify the round's refresh against the package key and apply it to the held emulator; else PackageError."""
    if not refresh and not spec.refresh_signature:
        return
    if not refresh or not spec.refresh_signature:
        raise PackageError("offsite client: an emulator refresh without its signature (or a signature without factors); declined")
    base = base_model(model)
    try:
        signature = bytes.fromhex(spec.refresh_signature)
    except ValueError:
        raise PackageError(f"offsite client: '{REFRESH_SIGNATURE_KEY}' is not hex") from None
    verify_refresh(refresh, spec.refresh_round, base._fedsite_manifest_digest, signature, _public_key(spec.public_key_pem))
    if spec.refresh_round < getattr(base, "_fedsite_refresh_round", -1):
        raise PackageError(f"offsite client: refresh of round {spec.refresh_round} is older than the one applied; declined")
    try:
        apply_refresh(base, layer_map, refresh)
    except ValueError as err:
        raise PackageError(f"offsite client: {err}") from None
    base._fedsite_refresh_round = spec.refresh_round


def _public_key(pem: str, what: str = "coordinator's public key") -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as err:
        raise PackageError(f"offsite client: the {what} is not a PEM key: {str(err).splitlines()[0]}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PackageError(f"offsite client: the {what} is {type(key).__name__}, expected Ed25519")
    return key


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@lru_cache(maxsize=2)
def _load(package: str, public_key_pem: str, mode: str, settings: LoraSettings, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LayerMap]:
    emulator, tokenizer, layer_map, _ = load_package(Path(package), _public_key(public_key_pem))
    emulator._fedsite_manifest_digest = manifest_digest((Path(package) / MANIFEST).read_bytes())  # binds refreshes to it
    return trainable_model(emulator, layer_map, mode, settings, seed), tokenizer, layer_map
