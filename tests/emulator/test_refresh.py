"""Low-rank refreshes of the emulator's middle: signed, applied exactly, refused when tampered."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from emulator.build import build_emulator, decoder_layers
from emulator.distill import text_batches
from emulator.keys import PackageError
from emulator.layers import make_layer_map
from emulator.package import load_package, write_package
from emulator.refresh import (
    CHILD,
    align_refresh,
    apply_refresh,
    attach_refresh,
    manifest_digest,
    refresh_arrays,
    refresh_bytes,
    sign_refresh,
    verify_refresh,
)
from tests.emulator.conftest import logits

TEXTS = [f"item {i}: {'abcdefgh'[i % 8] * (i % 5 + 1)} = {i * 7}" for i in range(16)]


def random_factors(model, layer_map, seed=0):
    deltas = attach_refresh(model, layer_map, rank=2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in deltas.values():
            delta.B.copy_(torch.randn(delta.B.shape, generator=generator) * 0.05)
    return refresh_arrays(model)


@pytest.fixture(params=["drop", "share"])
def package(request, tiny8, signing_key, tmp_path):
    lm = make_layer_map(8, 2, 2, fill=request.param)
    emulator = build_emulator(tiny8[0], lm, quantize="int8")
    write_package(emulator, tiny8[1], lm, tmp_path / "pkg", signing_key, "tiny", 1)
    return lm, tmp_path / "pkg", manifest_digest((tmp_path / "pkg" / "manifest.pb").read_bytes())


def test_refresh_round_trips_verifies_and_applies_exactly(package, signing_key, batch):
    lm, folder, digest = package
    coordinator, _, _, _ = load_package(folder, signing_key.public_key())
    before = logits(coordinator, batch)
    arrays = random_factors(coordinator, lm)
    assert {k.split(".")[2] for k in arrays} == {str(i) for i in lm.middle_kept}  # original block indices
    signature = sign_refresh(arrays, 3, digest, signing_key)
    client, _, _, _ = load_package(folder, signing_key.public_key())  # the emulator a client holds
    verify_refresh(arrays, 3, digest, signature, signing_key.public_key())
    apply_refresh(client, lm, arrays)
    assert torch.equal(logits(client, batch), logits(coordinator, batch))
    assert not torch.allclose(logits(client, batch), before, atol=1e-4)
    layers = decoder_layers(client)
    for slot, source in enumerate(lm.stack()):  # shared slots run the refreshed block too
        if source in lm.middle_kept:
            assert getattr(layers[slot].mlp.up_proj, CHILD) is getattr(layers[lm.emulator_index()[source]].mlp.up_proj, CHILD)
    assert all(not p.requires_grad for name, p in client.named_parameters() if CHILD in name)
    later = random_factors(coordinator, lm, seed=1)  # the next round's refresh replaces this one
    apply_refresh(client, lm, later)
    fresh, _, _, _ = load_package(folder, signing_key.public_key())
    apply_refresh(fresh, lm, later)
    assert torch.equal(logits(client, batch), logits(fresh, batch))
    assert refresh_bytes(arrays) < (folder / "emulator.safetensors").stat().st_size / 2


def test_a_refresh_computes_w_plus_ba_beside_the_frozen_weight(package, signing_key):
    lm, folder, _ = package
    model, _, _, _ = load_package(folder, signing_key.public_key())
    random_factors(model, lm)
    linear = decoder_layers(model)[lm.emulator_index()[lm.middle_kept[0]]].self_attn.q_proj
    delta = getattr(linear, CHILD)
    x = torch.randn(2, 5, linear.in_features)
    merged = torch.nn.functional.linear(x, linear.weight + delta.B @ delta.A, linear.bias)
    assert torch.allclose(linear(x), merged, atol=1e-5)
    assert not torch.allclose(linear(x), torch.nn.functional.linear(x, linear.weight, linear.bias), atol=1e-4)


def test_tampered_refresh_is_refused(package, signing_key, tiny8):
    lm, folder, digest = package
    model, _, _, _ = load_package(folder, signing_key.public_key())
    arrays = random_factors(model, lm)
    signature = sign_refresh(arrays, 3, digest, signing_key)
    key = signing_key.public_key()
    name = next(iter(arrays))
    tampered = {**arrays, name: arrays[name] + np.float32(1e-3)}
    cases = [
        (tampered, 3, digest, signature, key),
        ({k: v for k, v in arrays.items() if k != name}, 3, digest, signature, key),
        (arrays, 4, digest, signature, key),  # replayed in another round
        (arrays, 3, manifest_digest(b"another package"), signature, key),
        (arrays, 3, digest, signature, Ed25519PrivateKey.generate().public_key()),
        (arrays, 3, digest, signature[:-1] + bytes([signature[-1] ^ 1]), key),
    ]
    for case in cases:
        with pytest.raises(PackageError, match="emulator refresh: bad signature") as err:
            verify_refresh(*case)
        assert "\n" not in str(err.value)
    with pytest.raises(PackageError, match="not an Ed25519 signature"):
        verify_refresh(arrays, 3, digest, signature[:10], key)
    other = load_package(folder, key)[0]
    with pytest.raises(ValueError, match="has shape"):
        apply_refresh(other, lm, {**arrays, name: arrays[name][:1]})
    with pytest.raises(ValueError, match="not finite"):
        apply_refresh(other, lm, {**arrays, name: arrays[name] * np.nan})
    with pytest.raises(ValueError, match="unknown"):
        apply_refresh(other, lm, {**arrays, "model.layers.3.mlp.up_proj.lora_A": arrays[name]})


def test_alignment_trains_only_the_refresh_and_brings_the_quantized_emulator_closer(tiny8):
    full, tokenizer = tiny8
    lm = make_layer_map(8, 2, 2, fill="share")
    emulator = build_emulator(full, lm, quantize="int8")
    batches = text_batches(tokenizer, TEXTS, batch_size=8, max_length=32)
    frozen = [(p, p.detach().clone()) for p in emulator.parameters()]
    trainable = {id(p) for p in emulator.parameters() if p.requires_grad}

    def kl():
        with torch.no_grad():
            p, q = torch.log_softmax(logits(full, batches[0]), -1), torch.log_softmax(logits(emulator, batches[0]), -1)
            return float((p.exp() * (p - q)).sum(-1).mean())

    before = kl()
    losses = align_refresh(emulator, full, lm, batches, rank=4, steps=15, lr=1e-2)
    assert losses[-1] < losses[0] and kl() < 0.8 * before
    assert all(torch.equal(p, copy) for p, copy in frozen)  # the package's weights (int8 middle, adapters) untouched
    middle = decoder_layers(emulator)[2].mlp.up_proj
    x = torch.randn(3, middle.in_features)
    assert not torch.allclose(middle(x), torch.nn.functional.linear(x, middle.weight, middle.bias))  # the refresh is what changed
    assert not any(CHILD in name for name, _ in full.named_parameters())  # the backbone carries no refresh
    assert {id(p) for p in emulator.parameters() if p.requires_grad} - trainable == set()  # factors frozen again
    assert {id(p) for p in emulator.parameters() if p.requires_grad} == trainable
    assert any(np.abs(v).max() > 0 for k, v in refresh_arrays(emulator).items() if k.endswith("lora_B"))


@pytest.mark.parametrize("fill", ["drop", "share"])
def test_fold_refresh_puts_the_factors_into_the_weights(tiny8, batch, fill):
    from emulator.refresh import fold_refresh

    lm = make_layer_map(8, 2, 2, fill=fill)
    emulator = build_emulator(tiny8[0], lm)
    before = {k: v.clone() for k, v in emulator.state_dict().items()}
    random_factors(emulator, lm)
    hooked = logits(emulator, batch)
    assert fold_refresh(emulator, lm) == 7 * len(lm.middle_kept)  # once per unique weight, shared slots too
    assert not any(hasattr(m, CHILD) for m in emulator.modules())
    torch.testing.assert_close(logits(emulator, batch), hooked, rtol=1e-5, atol=1e-5)
    changed = {k for k, v in emulator.state_dict().items() if k in before and not torch.equal(v, before[k])}
    assert changed and all(".mlp." in k or ".self_attn." in k for k in changed)


def test_low_rank_distillation_changes_the_middle_by_a_low_rank_delta_and_fits(tiny8):
    from emulator.distill import distill_middle

    full, tokenizer = tiny8
    lm = make_layer_map(8, 2, 2)
    emulator = build_emulator(full, lm)
    weights = lambda m: {n: p.detach().clone() for n, p in m.named_parameters() if ".mlp." in n or ".self_attn." in n}
    before = weights(emulator)
    batches = text_batches(tokenizer, TEXTS, batch_size=8, max_length=32)
    losses = distill_middle(emulator, full, lm, batches, steps=20, lr=3e-2, objective="logits", rank=2)
    assert losses[-1] < 0.7 * losses[0], losses
    after = weights(emulator)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved and all(torch.linalg.matrix_rank(after[n] - before[n], atol=1e-6) <= 2 for n in moved)
    assert emulator.config.emulator_distilled and not any(hasattr(m, CHILD) for m in emulator.modules())
    assert {n.split(".")[2] for n, p in emulator.named_parameters() if p.requires_grad} == {"0", "1", "4", "5"}
