"""Signed emulator packages: what the coordinator ships to clients that must not hold the backbone.

Layout of a package folder:

    emulator.safetensors   weights (middle Linear weights as codes + absmax when quantized)
    config.json            the emulator's model config (num_hidden_layers = emulator blocks)
    generation_config.json, tokenizer files   so a client loads the emulator standalone
    manifest.pb            fedsite.EmulatorManifest: layer map, sizes, sha256 of every file above
    manifest.sig           Ed25519 signature (64 raw bytes) over the exact bytes of manifest.pb
    public_key.pem         convenience copy of the signer's key (not trusted: pin it out of band)

A fill-"share" emulator (emulator/layers.py) is stored compact, each kept block once, exactly
as the "drop" emulator with the same kept blocks; the signed manifest adds the fill and the
slot map, and `load_package` rebuilds the full-depth stack from them.

`verify_package` checks the signature first, then every listed file's size and sha256, and
that nothing else is in the folder; `load_package` verifies before it loads anything.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError
from peft import PeftModel
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from emulator.build import compact_view, decoder_layers, expand_shared, freeze_non_adapter, middle_linear_weights, unique_parameters
from emulator.held import QuantizedLinear, hold_quantized
from emulator.keys import PackageError, key_id, load_public_key, public_key_pem
from emulator.layers import LayerMap
from emulator.quantize import METHODS, quantize_tensor
from protos import manifest_pb2

FORMAT_VERSION = "1"
WEIGHTS = "emulator.safetensors"
MANIFEST, SIGNATURE, PUBLIC_KEY = "manifest.pb", "manifest.sig", "public_key.pem"
ENVELOPE = (MANIFEST, SIGNATURE, PUBLIC_KEY)


# ------------------------------------------------------------------ write


def write_package(
    emulator_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    layer_map: LayerMap,
    out_dir: str | Path,
    signing_key: Ed25519PrivateKey,
    backbone_id: str,
    backbone_bytes: int,
    *,
    backbone_params: int = 0,
) -> manifest_pb2.EmulatorManifest:
    """Write and sign the package folder `out_dir` (replaced atomically if it holds an old package)."""
    if any(isinstance(m, QuantizedLinear) for m in emulator_model.modules()):
        raise ValueError("write_package: this emulator was loaded from a package (its middle is held as codes); build a package from the backbone")
    if isinstance(emulator_model, PeftModel):
        raise PackageError("emulator: write the plain emulator, not a PeftModel (merge or drop LoRA first)")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists())):
        raise PackageError(f"{out_dir}: exists and is not an emulator package; refusing to overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        stored = compact_view(emulator_model, layer_map)  # fill "share": each kept block once
        compact = layer_map.compact()
        config = stored.config
        method = getattr(config, "emulator_quantization", "") or ""
        save_file(_weights_to_store(stored, compact, method), str(tmp / WEIGHTS), metadata={"format": "pt", "quantization": method})
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
        if getattr(emulator_model, "generation_config", None) is not None:
            emulator_model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        params, _ = unique_parameters(emulator_model)
        adapter_params = sum(
            p.numel() for i in compact.adapter_layers() for p in decoder_layers(stored)[compact.emulator_index()[i]].parameters()
        )
        manifest = manifest_pb2.EmulatorManifest(
            format_version=FORMAT_VERSION,
            backbone_id=backbone_id,
            num_layers=layer_map.num_layers,
            bottom=layer_map.bottom,
            middle_kept=layer_map.middle_kept,
            top=layer_map.top,
            quantization=method,
            distilled=bool(getattr(config, "emulator_distilled", False)),
            files=[manifest_pb2.FileEntry(name=p.relative_to(tmp).as_posix(), size=p.stat().st_size, sha256=_sha256(p)) for p in files],
            model_type=str(getattr(config, "model_type", "")),
            dtype="float32",
            emulator_params=params,
            adapter_params=adapter_params,
            emulator_bytes=(tmp / WEIGHTS).stat().st_size,
            backbone_params=backbone_params,
            backbone_bytes=int(backbone_bytes),
            signer_key_id=key_id(signing_key.public_key()),
            weights_file=WEIGHTS,
            fill=layer_map.fill,
            slots=layer_map.slots,
        )
        data = manifest.SerializeToString(deterministic=True)
        (tmp / MANIFEST).write_bytes(data)
        (tmp / SIGNATURE).write_bytes(signing_key.sign(data))
        (tmp / PUBLIC_KEY).write_bytes(public_key_pem(signing_key.public_key()))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a package is meant to be shipped
        for path in tmp.iterdir():
            path.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _weights_to_store(model: PreTrainedModel, layer_map: LayerMap, method: str) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors once and, if quantized, middle weights as codes + absmax."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied lm_head: stored once under the embedding's name
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().to(torch.float32).contiguous().clone()
    if method:
        for name in middle_linear_weights(model, layer_map):
            parts = quantize_tensor(tensors.pop(name), method)
            tensors[f"{name}.q"], tensors[f"{name}.absmax"] = parts["q"], parts["absmax"]
    return tensors


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------ verify and load


def verify_package(directory: str | Path, public_key: Ed25519PublicKey | str | Path) -> manifest_pb2.EmulatorManifest:
    """The manifest of a package whose signature, files, sizes and hashes all check out."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PackageError(f"{directory}: package folder not found")
    key = public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
    for name in (MANIFEST, SIGNATURE):
        if not (directory / name).is_file():
            raise PackageError(f"{name}: missing from the package")
    data, signature = (directory / MANIFEST).read_bytes(), (directory / SIGNATURE).read_bytes()
    if len(signature) != 64:
        raise PackageError(f"{SIGNATURE}: not an Ed25519 signature (64 bytes expected, got {len(signature)}; truncated?)")
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise PackageError(_bad_signature_reason(data, key)) from None
    manifest = manifest_pb2.EmulatorManifest()
    try:
        manifest.ParseFromString(data)
    except DecodeError as err:  # signed but malformed: a broken signer, not an attacker
        raise PackageError(f"{MANIFEST}: signed but not an EmulatorManifest ({err})") from None
    if manifest.format_version != FORMAT_VERSION:
        raise PackageError(f"{MANIFEST}: format_version '{manifest.format_version}' is not supported (expected '{FORMAT_VERSION}')")
    if manifest.quantization not in ("", *METHODS):
        raise PackageError(f"{MANIFEST}: unknown quantization '{manifest.quantization}' (expected '', int8 or nf4)")
    if (directory / PUBLIC_KEY).is_file():
        if (directory / PUBLIC_KEY).read_bytes() != public_key_pem(key):
            raise PackageError(f"{PUBLIC_KEY}: is not the public key used to verify (tampered or replaced)")
    listed = set()
    for entry in manifest.files:
        name = entry.name
        path = directory / name
        if not name or name.startswith("/") or ".." in Path(name).parts or name in ENVELOPE:
            raise PackageError(f"{MANIFEST}: file entry '{name}' is not a plain name inside the package")
        listed.add(name)
        if not path.is_file():
            raise PackageError(f"{name}: missing from the package")
        size = path.stat().st_size
        if size != entry.size:
            why = "truncated" if size < entry.size else "grown"
            raise PackageError(f"{name}: size {size} bytes, manifest says {entry.size} ({why})")
        if _sha256(path) != entry.sha256:
            raise PackageError(f"{name}: sha256 does not match the manifest (tampered)")
    if manifest.weights_file not in listed:
        raise PackageError(f"{MANIFEST}: weights file '{manifest.weights_file}' is not listed")
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if name not in listed and name not in ENVELOPE and not (path.is_dir() and any(n.startswith(name + "/") for n in listed)):
            raise PackageError(f"{name}: unexpected file, not in the manifest")
    try:
        manifest_layer_map(manifest)
    except ValueError as err:
        raise PackageError(f"{MANIFEST}: {err}") from None
    return manifest


def _bad_signature_reason(data: bytes, key: Ed25519PublicKey) -> str:
    """Tell a wrong key from a tampered manifest where the (untrusted) manifest allows it."""
    try:
        claimed = manifest_pb2.EmulatorManifest.FromString(data).signer_key_id
    except Exception:  # noqa: BLE001 - unparsable means tampered
        claimed = ""
    if claimed and claimed != key_id(key):
        return f"{SIGNATURE}: signed by key {claimed[:16]}, not by the given public key {key_id(key)[:16]} (wrong key, or tampered {MANIFEST})"
    return f"{SIGNATURE}: bad signature over {MANIFEST} (tampered {MANIFEST} or {SIGNATURE}, or wrong key)"


def manifest_layer_map(manifest: manifest_pb2.EmulatorManifest) -> LayerMap:
    fields = (manifest.num_layers, tuple(manifest.bottom), tuple(manifest.middle_kept), tuple(manifest.top))
    return LayerMap(*fields, manifest.fill or "drop", tuple(manifest.slots))


def load_package(
    directory: str | Path, public_key: Ed25519PublicKey | str | Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LayerMap, manifest_pb2.EmulatorManifest]:
    """(emulator in eval mode, fp32, adapter blocks trainable; tokenizer; layer map; manifest)."""
    directory = Path(directory)
    manifest = verify_package(directory, public_key)
    layer_map = manifest_layer_map(manifest)
    entry = next(e for e in manifest.files if e.name == manifest.weights_file)
    data = (directory / entry.name).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.sha256:  # re-check the bytes actually loaded
        raise PackageError(f"{entry.name}: changed after verification")
    config = AutoConfig.from_pretrained(directory)
    compact = layer_map.compact()  # what the weights file holds, whatever the fill
    if config.num_hidden_layers != len(layer_map.emulator_layers()):
        raise PackageError(f"config.json: {config.num_hidden_layers} blocks, manifest lists {len(layer_map.emulator_layers())}")
    with no_init_weights():  # every tensor is loaded below: skip the random init (and its memory)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # skipped with the init
    stored = load_safetensors_bytes(data)
    del data
    method = manifest.quantization
    state = model.state_dict()
    codes = {}
    if method:
        for name in middle_linear_weights(model, compact):
            if f"{name}.q" not in stored or f"{name}.absmax" not in stored:
                raise PackageError(f"{entry.name}: quantized weight '{name}' is missing")
            codes[name] = {"q": stored.pop(f"{name}.q"), "absmax": stored.pop(f"{name}.absmax")}
    unknown = sorted(set(stored) - set(state))
    missing = sorted(set(state) - set(stored) - set(codes) - _tied_names(model))
    if unknown or missing:
        what = f"unknown tensor '{unknown[0]}'" if unknown else f"missing tensor '{missing[0]}'"
        raise PackageError(f"{entry.name}: does not match config.json ({what})")
    for name, tensor in stored.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise PackageError(f"{entry.name}: '{name}' has shape {tuple(tensor.shape)}, config expects {tuple(state[name].shape)}")
    del state
    try:
        hold_quantized(model, codes, method)  # the middle stays int8/NF4 in memory
    except ValueError as err:
        raise PackageError(f"{entry.name}: {err}") from None
    model.load_state_dict(stored, strict=False)
    del stored
    if layer_map.fill == "share":
        expand_shared(model, layer_map)
    freeze_non_adapter(model, layer_map)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer, layer_map, manifest


def _tied_names(model: PreTrainedModel) -> set[str]:
    """State-dict names that alias an earlier tensor (e.g. a tied lm_head.weight)."""
    seen: set[int] = set()
    tied = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            tied.add(name)
        seen.add(tensor.data_ptr())
    return tied
