import numpy as np
import pytest
import torch
from torch import nn

from emulator.build import build_emulator, decoder_layers
from emulator.distill import text_batches
from emulator.held import QuantizedLinear, hold_quantized
from emulator.keys import PackageError
from emulator.layers import make_layer_map
from emulator.offsite import trainable_model
from emulator.package import load_package, write_package
from emulator.quantize import dequantize_tensor, quantize_tensor
from emulator.refresh import align_refresh, refresh_arrays
from finetune.lora import LoraSettings
from tests.emulator.conftest import logits
from tests.emulator.test_refresh import TEXTS


@pytest.mark.parametrize("method", ["int8", "nf4"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_held_linear_computes_and_backpropagates_as_its_dequantized_weight(method, bias):
    torch.manual_seed(0)
    linear = nn.Linear(40, 24, bias=bias)
    parts = quantize_tensor(linear.weight, method)
    plain = nn.Linear(40, 24, bias=bias)
    with torch.no_grad():
        plain.weight.copy_(dequantize_tensor(parts, method, (24, 40)))
        if bias:
            plain.bias.copy_(linear.bias)
    held = QuantizedLinear(linear, parts, method)
    x = torch.randn(3, 5, 40, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, ref = held(x), plain(x2)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=0)
    if bias:
        torch.testing.assert_close(held.bias.grad, plain.bias.grad, atol=1e-5, rtol=0)
    assert torch.equal(held.weight, plain.weight)
    assert isinstance(held, nn.Linear) and "weight" not in dict(held.named_parameters())
    assert held.codes.q.dtype == (torch.int8 if method == "int8" else torch.uint8)


def test_a_short_last_block_is_padded_exactly():
    weight = torch.randn(7, 10)  # 70 values: a full block and a short one
    parts = quantize_tensor(weight, "int8")
    torch.testing.assert_close(dequantize_tensor(parts, "int8", (7, 10)), weight, atol=weight.abs().max().item() / 127, rtol=0)


def test_malformed_codes_are_refused_not_run():
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    good = quantize_tensor(model[0].weight, "int8")
    for bad, why in [
        ({"q": good["q"][:-1], "absmax": good["absmax"]}, "codes"),
        ({"q": good["q"].to(torch.int16), "absmax": good["absmax"]}, "codes"),
        ({"q": good["q"], "absmax": torch.full_like(good["absmax"], float("nan"))}, "absmax"),
        ({"q": good["q"]}, "missing"),
        ({"q": good["q"], "absmax": good["absmax"][:, None]}, "flat"),  # would broadcast to blocks x blocks
    ]:
        with pytest.raises(ValueError, match=why):
            hold_quantized(model, {"0.weight": bad}, "int8")
        assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="not a plain Linear"):
        hold_quantized(nn.Sequential(nn.ReLU()), {"0.weight": good}, "int8")


@pytest.mark.parametrize("fill", ["drop", "share"])
def test_a_loaded_quantized_package_holds_its_middle_as_codes(tiny8, signing_key, tmp_path, batch, fill):
    lm = make_layer_map(8, 2, 2, fill=fill)
    emulator = build_emulator(tiny8[0], lm, quantize="int8")  # fp32, weights rounded in memory
    write_package(emulator, tiny8[1], lm, tmp_path / "q", signing_key, "tiny", 1)
    loaded, _, _, _ = load_package(tmp_path / "q", signing_key.public_key())
    middle = [m for p in lm.middle_positions() for m in decoder_layers(loaded)[p].modules() if isinstance(m, nn.Linear)]
    assert middle and all(isinstance(m, QuantizedLinear) for m in middle)
    adapters = [m for p in (0, 1, len(decoder_layers(loaded)) - 1) for m in decoder_layers(loaded)[p].modules() if isinstance(m, nn.Linear)]
    assert not any(isinstance(m, QuantizedLinear) for m in adapters)

    def param_bytes(model):
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())

    assert param_bytes(loaded) < param_bytes(emulator)
    torch.testing.assert_close(logits(loaded, batch), logits(emulator, batch), atol=1e-5, rtol=0)

    # LoRA on the adapter blocks trains through the held middle exactly as through fp32 weights
    settings = LoraSettings(rank=2, alpha=4)
    grads = []
    for model in (emulator, loaded):
        peft = trainable_model(model, lm, "lora", settings, seed=0)
        out = peft(**batch, labels=batch["input_ids"])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_a_package_with_malformed_codes_is_refused(tiny8, signing_key, tmp_path, map8):
    """Signed by the coordinator's key but with codes that do not fit the config: refused on load."""
    from safetensors.torch import load_file, save_file

    emulator = build_emulator(tiny8[0], map8, quantize="int8")
    write_package(emulator, tiny8[1], map8, tmp_path / "q", signing_key, "tiny", 1)
    weights = tmp_path / "q" / "emulator.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith(".q"))
    tensors[name] = tensors[name][:-64]
    save_file(tensors, weights)
    _resign(tmp_path / "q", signing_key)
    with pytest.raises(PackageError, match=r"emulator\.safetensors: .*codes"):
        load_package(tmp_path / "q", signing_key.public_key())


def _resign(folder, signing_key):
    import hashlib

    from protos import manifest_pb2

    manifest = manifest_pb2.EmulatorManifest.FromString((folder / "manifest.pb").read_bytes())
    for entry in manifest.files:
        data = (folder / entry.name).read_bytes()
        entry.size, entry.sha256 = len(data), hashlib.sha256(data).hexdigest()
    data = manifest.SerializeToString(deterministic=True)
    (folder / "manifest.pb").write_bytes(data)
    (folder / "manifest.sig").write_bytes(signing_key.sign(data))


def test_alignment_on_a_held_middle_follows_the_fp32_one(tiny8, signing_key, tmp_path):
    """The coordinator aligns the emulator it loaded from the package (held codes): the refresh
    trains as on the in-memory emulator with the same rounded weights in fp32."""
    full, tokenizer = tiny8
    lm = make_layer_map(8, 2, 2, fill="share")
    emulator = build_emulator(full, lm, quantize="int8")
    write_package(emulator, tokenizer, lm, tmp_path / "q", signing_key, "tiny", 1)
    held = load_package(tmp_path / "q", signing_key.public_key())[0]
    batches = text_batches(tokenizer, TEXTS, batch_size=8, max_length=32)
    losses = [align_refresh(model, full, lm, batches, rank=4, steps=5, lr=1e-2) for model in (emulator, held)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4, atol=1e-6)
    assert losses[1][-1] < losses[1][0]
    fp32, codes = refresh_arrays(emulator), refresh_arrays(held)
    for name in fp32:
        np.testing.assert_allclose(codes[name], fp32[name], atol=1e-5)


def test_shared_slots_keep_sharing_their_codes_through_a_move_and_a_cast(tiny8, signing_key, tmp_path, batch):
    lm = make_layer_map(8, 2, 2, fill="share")
    write_package(build_emulator(tiny8[0], lm, quantize="int8"), tiny8[1], lm, tmp_path / "q", signing_key, "tiny", 1)
    loaded = load_package(tmp_path / "q", signing_key.public_key())[0]
    before = logits(loaded, batch)

    def code_storages(model):
        return {m.codes.q.data_ptr() for m in model.modules() if isinstance(m, QuantizedLinear)}

    count = len(code_storages(loaded))
    loaded._apply(lambda t: t.clone())  # what .to(another device) does to every buffer
    assert len(code_storages(loaded)) == count
    assert decoder_layers(loaded)[5].mlp.up_proj.codes is decoder_layers(loaded)[4].mlp.up_proj.codes
    torch.testing.assert_close(logits(loaded, batch), before, atol=0, rtol=0)
    loaded.to(torch.bfloat16)
    held = decoder_layers(loaded)[2].mlp.up_proj
    assert held.codes.absmax.dtype == torch.float32 and held.codes.q.dtype == torch.int8  # scales are not weights
    loaded.to(torch.float32)
    torch.testing.assert_close(logits(loaded, batch).float(), before, atol=1e-2, rtol=0)  # only the bf16 round trip of the rest


def test_a_loaded_emulator_is_not_repackaged(tiny8, signing_key, tmp_path, map8):
    write_package(build_emulator(tiny8[0], map8, quantize="int8"), tiny8[1], map8, tmp_path / "q", signing_key, "tiny", 1)
    loaded = load_package(tmp_path / "q", signing_key.public_key())[0]
    with pytest.raises(ValueError, match="loaded from a package"):
        write_package(loaded, tiny8[1], map8, tmp_path / "again", signing_key, "tiny", 1)
