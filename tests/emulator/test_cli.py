import pytest

from emulator.cli import build_command, verify_command
from emulator.package import PackageError, load_package


def test_build_then_verify(tmp_path, capsys):
    summary = build_command("tiny", str(tmp_path / "pkg"), adapter_layers=1, stride=2, quantize=None, key_path=None)
    out = capsys.readouterr().out
    assert "emulator package" in out and "of the backbone" in out and "dropped 1" in out
    assert summary["layer_map"] == {"num_layers": 4, "bottom": [0], "middle_kept": [1], "top": [3]}
    assert summary["dropped"] == [2]
    assert 0 < summary["emulator_bytes"] < summary["backbone_bytes"]
    assert summary["ratio"] == summary["emulator_bytes"] / summary["backbone_bytes"]
    assert (tmp_path / "keys" / "signing_key.pem").is_file() and (tmp_path / "keys" / "public_key.pem").is_file()
    assert not (tmp_path / "pkg" / "signing_key.pem").exists()
    assert summary["signing_key_created"]

    assert verify_command(str(tmp_path / "pkg")) == 0
    assert "pin the coordinator's key" in capsys.readouterr().err
    assert verify_command(str(tmp_path / "pkg"), str(tmp_path / "keys" / "public_key.pem")) == 0
    load_package(tmp_path / "pkg", tmp_path / "keys" / "public_key.pem")

    again = build_command("tiny", str(tmp_path / "pkg"), 1, 2, "int8", None)  # reuses the key
    assert not again["signing_key_created"] and again["key_id"] == summary["key_id"]
    assert again["emulator_bytes"] < summary["emulator_bytes"] and again["quantization"] == "int8"


def test_verify_reports_one_line_naming_the_file(tmp_path, capsys):
    build_command("tiny", str(tmp_path / "pkg"), 1, 1, None, str(tmp_path / "coordinator.pem"))
    capsys.readouterr()
    weights = tmp_path / "pkg" / "emulator.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert verify_command(str(tmp_path / "pkg"), str(tmp_path / "coordinator.pub.pem")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "emulator.safetensors" in err[0] and "tampered" in err[0]


def test_verify_with_wrong_key_fails(tmp_path, capsys):
    build_command("tiny", str(tmp_path / "a"), 1, 2, None, str(tmp_path / "ka" / "k.pem"))
    build_command("tiny", str(tmp_path / "b"), 1, 2, None, str(tmp_path / "kb" / "k.pem"))
    capsys.readouterr()
    assert verify_command(str(tmp_path / "a"), str(tmp_path / "kb" / "k.pub.pem")) == 1
    assert "wrong key" in capsys.readouterr().err
    assert verify_command(str(tmp_path / "missing"), str(tmp_path / "ka" / "k.pub.pem")) == 1


def test_key_inside_the_package_is_refused(tmp_path):
    with pytest.raises(PackageError, match="must not live inside the package"):
        build_command("tiny", str(tmp_path / "pkg"), 1, 2, None, str(tmp_path / "pkg" / "signing_key.pem"))


def test_build_share_then_verify(tmp_path, capsys):
    summary = build_command("tiny", str(tmp_path / "pkg"), 1, 2, None, None, fill="share")
    assert "slots refilled by sharing" in capsys.readouterr().out
    assert summary["fill"] == "share" and summary["layer_map"]["slots"] == [0, 1, 1, 3]
    drop = build_command("tiny", str(tmp_path / "drop"), 1, 2, None, None)
    assert summary["emulator_bytes"] == drop["emulator_bytes"]
    capsys.readouterr()
    assert verify_command(str(tmp_path / "pkg")) == 0
    assert "depth kept by sharing" in capsys.readouterr().out


def test_build_keep_share_sets_the_kept_middle(tmp_path, capsys):
    summary = build_command("tiny", str(tmp_path / "pkg"), 1, 1, None, None, keep=0.5)  # 1 of the 2 middle blocks
    assert summary["layer_map"]["middle_kept"] == [1]
    assert summary["emulator_bytes"] < build_command("tiny", str(tmp_path / "all"), 1, 1, None, None)["emulator_bytes"]
    capsys.readouterr()
    assert verify_command(str(tmp_path / "pkg")) == 0


def test_a_stride_that_keep_overrides_is_named_in_a_warning(tmp_path, caplog, capsys):
    with caplog.at_level("WARNING", logger="fedsite.emulator"):
        summary = build_command("tiny", str(tmp_path / "pkg"), 1, 3, None, None, keep=0.8)
    assert summary["layer_map"]["middle_kept"] == [1]
    assert any("stride 3 is not used, keep 0.8" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedsite.emulator"):
        build_command("tiny", str(tmp_path / "pkg2"), 1, 3, None, None, keep=0.0)
    assert not caplog.records


def test_fedsite_emulator_build_fill_share_contract(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "pkg"
    build = subprocess.run([sys.executable, "-m", "fedsite.cli", "emulator", "build", "--model", "tiny", "--fill", "share", "--out", str(out)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    verify = subprocess.run([sys.executable, "-m", "fedsite.cli", "emulator", "verify", str(out)], capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout.startswith("ok:"), verify.stderr
