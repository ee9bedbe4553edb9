"""Offsite clients: train the adapter against the coordinator's emulator, never the backbone.

The round message names a signed emulator package (a local folder in simulation, or an
artifact fetched by content hash) and the coordinator's public key. The package is
verified before anything in it is loaded, then kept in memory for later rounds, like the
backbone of LoRA clients (`finetune.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_public_key
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emulator.keys import PackageError
from emulator.layers import LayerMap
from emulator.offsite import trainable_model
from emulator.package import load_package
from finetune.lora import LoraSettings

# ConfigRecord keys of an offsite client's round message
KIND_KEY = "kind"
PACKAGE_KEY = "emulator-package"
PUBLIC_KEY_KEY = "emulator-public-key"
MODE_KEY = "offsite-train"


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


def offsite_model(spec: OffsiteSpec, settings: LoraSettings, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LayerMap]:
    """The verified emulator made trainable in `spec.mode`, once per process and package."""
    return _load(spec, settings, seed)


@lru_cache(maxsize=2)
def _load(spec: OffsiteSpec, settings: LoraSettings, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LayerMap]:
    try:
        public_key = load_pem_public_key(spec.public_key_pem.encode())
    except ValueError as err:
        raise PackageError(f"offsite client: the coordinator's public key is not a PEM key: {err}") from None
    emulator, tokenizer, layer_map, _ = load_package(Path(spec.package), public_key)
    return trainable_model(emulator, layer_map, spec.mode, settings, seed), tokenizer, layer_map
