"""Low-rank refreshes of an emulator's frozen middle: FedBiOT-style alignment, shipped QLoRA-style.

The coordinator keeps aligning the emulator to the backbone between rounds (with the current
adapter plugged into both). Re-quantizing the int8/NF4 middle would erase such small updates,
and re-sending the package would cost its bytes every round. So the change travels as LoRA
factors on the frozen middle Linears: every slot running kept middle block i computes
W_i x + B_i (A_i x), W_i as the package stores it (dequantized), A_i, B_i in fp32. The factors
sit beside the Linear (a forward hook), as PEFT's LoRA does, never folded into a W-sized
tensor: a forward costs O(tokens x rank) more, and training them needs no gradient of W. A refresh holds
the factors of all kept middle blocks (keyed by ORIGINAL block index, as adapters are) and
replaces the previous one: a client applies it to the emulator it already holds.

A refresh is signed by the coordinator's package key over the package's manifest digest, the
round and every factor's name, dtype, shape and bytes (`sign_refresh`); `verify_refresh`
refuses anything else with a one-line PackageError before `apply_refresh` touches the model.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import nn
from transformers import PreTrainedModel

from emulator.build import LAYER_PREFIX, decoder_layers
from emulator.keys import PackageError
from emulator.layers import LayerMap

DOMAIN = b"fedsite-emulator-refresh/1"
_ATTR = "_fedsite_refresh"
CHILD = "fedsite_refresh"  # the factors' module under each refreshed Linear


class LowRankDelta(nn.Module):
    """x -> B (A x), added to a frozen Linear's output (B starts at zero, so a fresh refresh changes nothing)."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features, generator=generator) / in_features**0.5)
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.A.dtype) @ self.A.t()) @ self.B.t()


def _add_delta(linear: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a refreshed Linear: W x (+ bias) + B (A x)."""
    return output + getattr(linear, CHILD)(inputs[0]).to(output.dtype)


def _slot_linears(model: PreTrainedModel, layer_map: LayerMap) -> list[tuple[str, nn.Linear]]:
    """(key of the source block's Linear, module) for every slot that runs a kept middle block."""
    layers, kept = decoder_layers(model), set(layer_map.middle_kept)
    out = []
    for position, source in enumerate(layer_map.stack()):
        if source in kept:
            out += [(f"{LAYER_PREFIX}{source}.{name}", m) for name, m in layers[position].named_modules() if isinstance(m, nn.Linear)]
    return out


def attach_refresh(model: PreTrainedModel, layer_map: LayerMap, rank: int, seed: int = 0) -> dict[str, LowRankDelta]:
    """LoRA factors beside the middle Linears of `model` (an emulator), once; shared slots share
    them (one module, registered under every Linear that runs it, so `.to()` moves it once).

    Pass the plain emulator (for a PeftModel, its `get_base_model()`)."""
    deltas: dict[str, LowRankDelta] | None = getattr(model, _ATTR, None)
    if deltas is not None:
        return deltas
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for key, linear in _slot_linears(model, layer_map):
        if key not in deltas:
            deltas[key] = LowRankDelta(linear.out_features, linear.in_features, rank, generator).to(next(itertools.chain(linear.parameters(), linear.buffers())).device)  # held codes have no weight
            deltas[key].requires_grad_(False)  # frozen on clients; only `align_refresh` trains them
        linear.add_module(CHILD, deltas[key])
        linear._fedsite_refresh_hook = linear.register_forward_hook(_add_delta)
    setattr(model, _ATTR, deltas)
    return deltas


@torch.no_grad()
def fold_refresh(model: PreTrainedModel, layer_map: LayerMap) -> int:
    """Add every attached factor pair into its Linear's weight (W += B A, once per weight that
    slots share) and take the factors off: the model then computes what it did with them, with
    plain Linears (build-time low-rank distillation, before the middle is quantized). Returns
    how many weights changed."""
    if getattr(model, _ATTR, None) is None:
        raise ValueError("emulator refresh: no refresh attached to this model")
    folded: set[int] = set()
    for _, linear in _slot_linears(model, layer_map):
        delta = getattr(linear, CHILD, None)
        if delta is None:
            continue
        if id(linear.weight) not in folded:
            linear.weight.add_((delta.B @ delta.A).to(linear.weight.dtype))
            folded.add(id(linear.weight))
        linear._fedsite_refresh_hook.remove()
        del linear._fedsite_refresh_hook
        delattr(linear, CHILD)
    delattr(model, _ATTR)
    return len(folded)


def refresh_arrays(model: PreTrainedModel) -> dict[str, np.ndarray]:
    """The attached factors as fp32 numpy copies: `<block key>.lora_A` (r x in), `.lora_B` (out x r)."""
    deltas = getattr(model, _ATTR, None)
    if deltas is None:
        raise ValueError("emulator refresh: no refresh attached to this model")
    out = {}
    for key, delta in deltas.items():
        out[f"{key}.lora_A"] = delta.A.detach().cpu().float().numpy().copy()
        out[f"{key}.lora_B"] = delta.B.detach().cpu().float().numpy().copy()
    return out


def refresh_parameters(model: PreTrainedModel) -> list[nn.Parameter]:
    deltas = getattr(model, _ATTR, None) or {}
    return [p for delta in deltas.values() for p in (delta.A, delta.B)]


def refresh_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(int(np.asarray(v).nbytes) for v in arrays.values())


@torch.no_grad()
def apply_refresh(model: PreTrainedModel, layer_map: LayerMap, arrays: Mapping[str, np.ndarray]) -> None:
    """Set the middle's factors to `arrays` exactly (replacing any earlier refresh); verify first."""
    names = sorted(arrays)
    if not names or not names[0].endswith(".lora_A"):
        raise ValueError("emulator refresh: no factors")
    rank = int(np.asarray(arrays[names[0]]).shape[0])
    deltas = attach_refresh(model, layer_map, rank)
    expected = {f"{key}.lora_{part}": getattr(delta, part) for key, delta in deltas.items() for part in ("A", "B")}
    missing, unknown = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or unknown:
        raise ValueError(f"emulator refresh: factors do not match the emulator's middle ({f'missing {missing[0]!r}' if missing else f'unknown {unknown[0]!r}'})")
    for name, target in expected.items():
        value = np.asarray(arrays[name])
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"emulator refresh: {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        if not np.isfinite(value).all():
            raise ValueError(f"emulator refresh: {name} is not finite")
    for name, target in expected.items():
        target.copy_(torch.from_numpy(np.array(arrays[name], dtype=np.float32)).to(target.device))


def manifest_digest(manifest_bytes: bytes) -> bytes:
    """What binds a refresh to one package: sha256 of its signed manifest.pb."""
    return hashlib.sha256(manifest_bytes).digest()


def _message(arrays: Mapping[str, np.ndarray], server_round: int, package_digest: bytes) -> bytes:
    digest = hashlib.sha256(DOMAIN + package_digest + struct.pack(">q", int(server_round)))
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(struct.pack(">I", len(name)) + name.encode() + str(value.dtype).encode() + str(value.shape).encode() + value.tobytes())
    return digest.digest()


def sign_refresh(arrays: Mapping[str, np.ndarray], server_round: int, package_digest: bytes, key: Ed25519PrivateKey) -> bytes:
    return key.sign(_message(arrays, server_round, package_digest))


def verify_refresh(arrays: Mapping[str, np.ndarray], server_round: int, package_digest: bytes, signature: bytes, key: Ed25519PublicKey) -> None:
    """PackageError unless `signature` signs exactly these factors for this round and package."""
    if len(signature) != 64:
        raise PackageError(f"emulator refresh: not an Ed25519 signature (64 bytes expected, got {len(signature)})")
    try:
        key.verify(signature, _message(arrays, server_round, package_digest))
    except InvalidSignature:
        raise PackageError(f"emulator refresh: bad signature for round {server_round} (tampered factors, another round or package, or wrong key)") from None


def align_refresh(
    emulator: PreTrainedModel,
    full_model: PreTrainedModel,
    layer_map: LayerMap,
    batches: Iterable,
    *,
    rank: int = 4,
    steps: int = 10,
    lr: float = 1e-3,
    objective: str = "logits+hidden",
    held: Iterable | None = None,
    on_held: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Warm-started alignment steps on the refresh factors only (the frozen, maybe quantized, middle
    and the adapters stay as they are); plug the round's adapter into both models first. With
    `held` batches the factors that score best on them are kept (the warm start included), and
    `on_held(step, loss)` sees each score."""
    from emulator.distill import distill_middle

    attach_refresh(emulator, layer_map, rank)
    return distill_middle(
        emulator, full_model, layer_map, batches, steps=steps, lr=lr, objective=objective, params=refresh_parameters(emulator), held=held, on_held=on_held,
    )
