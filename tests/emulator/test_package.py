import shutil

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from emulator.build import build_emulator, decoder_layers
from emulator.layers import make_layer_map
from emulator.keys import PackageError, generate_signing_key, key_id, load_public_key, load_signing_key
from emulator.package import load_package, verify_package, write_package
from emulator.quantize import canonical, fake_quantize
from tests.emulator.conftest import logits


@pytest.fixture()
def built(tiny8, map8, signing_key, tmp_path):
    model, tokenizer = tiny8
    emulator = build_emulator(model, map8)
    manifest = write_package(emulator, tokenizer, map8, tmp_path / "pkg", signing_key, "tiny", 12345)
    return emulator, tmp_path / "pkg", manifest


def flip_byte(path, position=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if position is None else position
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_round_trip_loads_the_same_emulator(built, tiny8, map8, signing_key, batch):
    emulator, folder, manifest = built
    model, tokenizer, layer_map, loaded_manifest = load_package(folder, signing_key.public_key())
    assert layer_map == map8 and loaded_manifest == manifest
    assert model.config.num_hidden_layers == 6
    assert torch.equal(logits(model, batch), logits(emulator, batch))
    assert tokenizer("ab c!")["input_ids"] == tiny8[1]("ab c!")["input_ids"]
    assert tokenizer.pad_token == "<pad>" and tokenizer.chat_template == tiny8[1].chat_template
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0", "1", "4", "5"}


def test_manifest_describes_the_package(built, signing_key):
    _, folder, manifest = built
    names = [f.name for f in manifest.files]
    assert "emulator.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not {"manifest.pb", "manifest.sig", "public_key.pem", "signing_key.pem"} & set(names)
    assert list(manifest.bottom) == [0, 1] and list(manifest.middle_kept) == [2, 4] and list(manifest.top) == [6, 7]
    assert manifest.num_layers == 8 and manifest.backbone_id == "tiny" and manifest.backbone_bytes == 12345
    assert manifest.emulator_bytes == (folder / "emulator.safetensors").stat().st_size
    assert manifest.signer_key_id == key_id(signing_key.public_key())
    assert manifest.quantization == "" and manifest.adapter_params < manifest.emulator_params
    assert (folder / "public_key.pem").is_file() and not (folder / "signing_key.pem").exists()


def test_dropped_blocks_are_absent_from_the_package(built, tiny8, map8):
    _, folder, _ = built
    full = tiny8[0]
    with safe_open(str(folder / "emulator.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert {int(k.split(".")[2]) for k in stored if k.startswith("model.layers.")} == set(range(6))
    kept = [t for i in map8.emulator_layers() for t in decoder_layers(full)[i].state_dict().values()]
    dropped_all = [t for i in map8.dropped() for t in decoder_layers(full)[i].state_dict().values()]
    # norm weights start as all-ones in every block, so only tensors unique to dropped blocks can be told apart
    dropped = [t for t in dropped_all if not any(t.shape == k.shape and torch.equal(t, k) for k in kept)]
    assert len(dropped) == len(dropped_all) - 2 * len(map8.dropped())  # all but the two norms per block
    for tensor in stored.values():
        assert not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in dropped)
    raw = (folder / "emulator.safetensors").read_bytes()
    for t in dropped:  # not even a 16-value run of any dropped weight, anywhere in the file
        assert t.flatten()[:16].numpy().tobytes() not in raw
    kept_weight = decoder_layers(full)[map8.middle_kept[0]].mlp.up_proj.weight.detach()
    assert kept_weight.flatten()[:16].numpy().tobytes() in raw  # the search itself works


def test_every_file_is_tamper_evident(built, signing_key, tmp_path):
    _, folder, _ = built
    names = sorted(p.name for p in folder.iterdir())
    assert {"manifest.pb", "manifest.sig", "public_key.pem", "emulator.safetensors"} <= set(names)
    for name in names:
        size = (folder / name).stat().st_size
        for position in (0, size // 2, size - 1):
            copy = tmp_path / f"copy-{name}-{position}"
            shutil.copytree(folder, copy)
            flip_byte(copy / name, position)
            with pytest.raises(PackageError, match=name.replace(".", r"\.")) as err:
                verify_package(copy, signing_key.public_key())
            assert "\n" not in str(err.value)
            with pytest.raises(PackageError):
                load_package(copy, signing_key.public_key())


def test_truncated_missing_and_extra_files(built, signing_key):
    _, folder, _ = built
    key = signing_key.public_key()
    weights = folder / "emulator.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-100])
    with pytest.raises(PackageError, match=r"emulator\.safetensors: size .* \(truncated\)"):
        verify_package(folder, key)
    weights.write_bytes(original)
    signature = (folder / "manifest.sig").read_bytes()
    (folder / "manifest.sig").write_bytes(signature[:40])
    with pytest.raises(PackageError, match=r"manifest\.sig: not an Ed25519 signature"):
        verify_package(folder, key)
    (folder / "manifest.sig").write_bytes(signature)
    verify_package(folder, key)
    tokenizer = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(PackageError, match=r"tokenizer\.json: missing"):
        verify_package(folder, key)
    (folder / "tokenizer.json").write_bytes(tokenizer)
    (folder / "extra.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(PackageError, match=r"extra\.safetensors: unexpected file"):
        verify_package(folder, key)
    (folder / "extra.safetensors").unlink()
    (folder / "manifest.pb").unlink()
    with pytest.raises(PackageError, match=r"manifest\.pb: missing"):
        verify_package(folder, key)


def test_wrong_public_key_is_rejected(built, tmp_path):
    _, folder, _ = built
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(PackageError, match=r"manifest\.sig: signed by key .*\(wrong key"):
        verify_package(folder, other)
    with pytest.raises(PackageError, match="wrong key"):
        load_package(folder, other)


@pytest.mark.parametrize("method", ["int8", "nf4", "4bit"])
def test_quantized_package_is_smaller_and_loads(built, tiny8, map8, signing_key, tmp_path, batch, method):
    _, plain_folder, plain = built
    model, tokenizer = tiny8
    emulator = build_emulator(model, map8, quantize=method)
    manifest = write_package(emulator, tokenizer, map8, tmp_path / "q", signing_key, "tiny", 1)
    assert manifest.quantization == canonical(method)
    assert manifest.emulator_bytes < plain.emulator_bytes
    loaded, _, _, _ = load_package(tmp_path / "q", signing_key.public_key())
    torch.testing.assert_close(logits(loaded, batch), logits(emulator, batch), atol=1e-5, rtol=0)
    # only the middle is rounded; the adapters are exact
    for position in (0, 1, 4, 5):
        assert torch.equal(decoder_layers(loaded)[position].mlp.up_proj.weight, decoder_layers(model)[map8.emulator_layers()[position]].mlp.up_proj.weight)
    original = decoder_layers(model)[2].mlp.up_proj.weight
    assert not torch.equal(decoder_layers(loaded)[2].mlp.up_proj.weight, original)
    assert torch.equal(fake_quantize(decoder_layers(loaded)[2].mlp.up_proj.weight, method), decoder_layers(loaded)[2].mlp.up_proj.weight)


def test_tied_embeddings_round_trip(signing_key, tmp_path, tiny8, batch):
    tokenizer = tiny8[1]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    lm = make_layer_map(5, 1, 2)
    emulator = build_emulator(model, lm, quantize="nf4")
    write_package(emulator, tokenizer, lm, tmp_path / "tied", signing_key, "tied", 1)
    loaded, _, _, _ = load_package(tmp_path / "tied", signing_key.public_key())
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(loaded, batch), logits(emulator, batch), atol=1e-5, rtol=0)


def test_keys_pem_and_raw(tmp_path):
    key = generate_signing_key(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        generate_signing_key(tmp_path / "k.pem")
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    (tmp_path / "k.raw").write_bytes(raw)
    assert key_id(load_signing_key(tmp_path / "k.raw").public_key()) == key_id(load_signing_key(tmp_path / "k.pem").public_key())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "p.raw").write_bytes(pub)
    assert key_id(load_public_key(tmp_path / "p.raw")) == key_id(key.public_key())
    (tmp_path / "junk.pem").write_bytes(b"not a key")
    with pytest.raises(PackageError, match=r"junk\.pem: not an Ed25519 public key"):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(PackageError, match="key file not found"):
        load_public_key(tmp_path / "absent.pem")


def test_write_refuses_to_overwrite_a_foreign_folder(tiny8, map8, signing_key, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    emulator = build_emulator(tiny8[0], map8)
    with pytest.raises(PackageError, match="not an emulator package"):
        write_package(emulator, tiny8[1], map8, tmp_path / "mine", signing_key, "tiny", 1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    write_package(emulator, tiny8[1], map8, tmp_path / "pkg", signing_key, "tiny", 1)
    write_package(emulator, tiny8[1], map8, tmp_path / "pkg", signing_key, "tiny", 2)  # a package is replaced
    assert verify_package(tmp_path / "pkg", signing_key.public_key()).backbone_bytes == 2


@pytest.fixture()
def shared(tiny8, signing_key, tmp_path):
    lm = make_layer_map(8, 2, 2, fill="share")
    emulator = build_emulator(tiny8[0], lm)
    manifest = write_package(emulator, tiny8[1], lm, tmp_path / "shared", signing_key, "tiny", 1)
    return emulator, lm, tmp_path / "shared", manifest


def test_shared_package_stores_each_unique_block_once(shared, built, signing_key, batch):
    emulator, lm, folder, manifest = shared
    with safe_open(str(folder / "emulator.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    _, drop_folder, drop_manifest = built  # the drop emulator with the same kept blocks
    with safe_open(str(drop_folder / "emulator.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(stored) and all(torch.equal(f.get_tensor(k), v) for k, v in stored.items())
    assert {int(k.split(".")[2]) for k in stored if k.startswith("model.layers.")} == set(range(6))
    weights = [v for k, v in stored.items() if k.endswith("up_proj.weight")]
    assert not any(torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1 :])  # no block twice
    assert manifest.emulator_bytes == drop_manifest.emulator_bytes  # bytes shrink like drop
    assert manifest.fill == "share" and list(manifest.slots) == [0, 1, 2, 2, 4, 4, 6, 7]
    assert manifest.emulator_params == drop_manifest.emulator_params and manifest.adapter_params == drop_manifest.adapter_params
    loaded, _, layer_map, _ = load_package(folder, signing_key.public_key())
    assert layer_map == lm and loaded.config.num_hidden_layers == 8
    layers = decoder_layers(loaded)
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(8)) and len({id(x) for x in layers}) == 8
    assert layers[3].mlp.up_proj.weight is layers[2].mlp.up_proj.weight
    assert torch.equal(logits(loaded, batch), logits(emulator, batch))
    trainable = {int(n.split(".")[2]) for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {0, 1, 6, 7}


def test_shared_quantized_package_round_trips(tiny8, signing_key, tmp_path, batch):
    lm = make_layer_map(8, 2, 2, fill="share")
    emulator = build_emulator(tiny8[0], lm, quantize="int8")
    write_package(emulator, tiny8[1], lm, tmp_path / "q", signing_key, "tiny", 1)
    loaded, _, _, _ = load_package(tmp_path / "q", signing_key.public_key())
    torch.testing.assert_close(logits(loaded, batch), logits(emulator, batch), atol=1e-5, rtol=0)
    assert decoder_layers(loaded)[5].mlp.up_proj.codes is decoder_layers(loaded)[4].mlp.up_proj.codes  # the slots share the held codes


def test_tampered_layer_map_is_refused(shared, signing_key, tmp_path):
    from protos import manifest_pb2

    _, _, folder, _ = shared
    manifest = manifest_pb2.EmulatorManifest.FromString((folder / "manifest.pb").read_bytes())
    manifest.slots[3] = 4  # still a valid-looking map, but not the signed one
    (folder / "manifest.pb").write_bytes(manifest.SerializeToString(deterministic=True))
    with pytest.raises(PackageError, match=r"manifest\.sig: bad signature"):
        verify_package(folder, signing_key.public_key())
    manifest.slots[3] = 3  # a slot running a dropped block, signed by the coordinator's own key
    data = manifest.SerializeToString(deterministic=True)
    (folder / "manifest.pb").write_bytes(data)
    (folder / "manifest.sig").write_bytes(signing_key.sign(data))
    with pytest.raises(PackageError, match=r"manifest\.pb: layer map: slot 3 runs block 3") as err:
        load_package(folder, signing_key.public_key())
    assert "\n" not in str(err.value)
    manifest.fill = "drop"  # slots without fill share: inconsistent
    data = manifest.SerializeToString(deterministic=True)
    (folder / "manifest.pb").write_bytes(data)
    (folder / "manifest.sig").write_bytes(signing_key.sign(data))
    with pytest.raises(PackageError, match="only for fill 'share'"):
        verify_package(folder, signing_key.public_key())
