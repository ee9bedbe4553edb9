"""Artifact wire format: references in ConfigRecords, deterministic folder tars, signed statements."""

from __future__ import annotations

import os
import tarfile

import pytest
from flwr.app import ConfigRecord

from protos.artifacts import ArtifactError, ArtifactRef, artifact_digest, folder_digest, signed_statement, unpack_folder, write_folder_tar

SHA = "ab" * 32


def make_folder(root, mtime: int):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    (root / "empty").mkdir()
    for path in [root / "a.txt", root / "sub" / "b.bin", root / "sub", root / "empty"]:
        os.utime(path, (mtime, mtime))
    return root


def test_ref_round_trips_through_a_flower_config_record():
    ref = ArtifactRef("127.0.0.1:5051", SHA, "folder")
    record = ConfigRecord(ref.to_config("emulator"))
    assert dict(record) == {"emulator": f"fedsite-artifact://127.0.0.1:5051/folder/{SHA}"}
    assert ArtifactRef.from_config(record, "emulator") == ref
    assert ArtifactRef.parse(str(ArtifactRef("[::1]:7", SHA, "file"))).address == "[::1]:7"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("http://x:1/file/" + SHA, "expected fedsite-artifact://"),
        ("fedsite-artifact://x:1/blob/" + SHA, "kind: 'blob'"),
        ("fedsite-artifact://x:1/file/" + SHA[:-1], "is not a sha256"),
        ("fedsite-artifact://x/file/" + SHA, "address: 'x' is not HOST:PORT"),
        ("fedsite-artifact://x:1/a/file/" + SHA, "expected fedsite-artifact://"),
    ],
)
def test_bad_references_are_refused_in_one_line(text, expected):
    with pytest.raises(ArtifactError, match=expected) as info:
        ArtifactRef.parse(text)
    assert "\n" not in str(info.value)


def test_missing_or_non_string_config_entry_is_named():
    with pytest.raises(ArtifactError, match="emulator: missing"):
        ArtifactRef.from_config({}, "emulator")
    with pytest.raises(ArtifactError, match="emulator: expected an artifact reference string, got int"):
        ArtifactRef.from_config({"emulator": 3}, "emulator")


def test_signed_statement_binds_hash_kind_and_size():
    base = signed_statement(SHA, "file", 10)
    assert len({base, signed_statement(SHA, "folder", 10), signed_statement(SHA, "file", 11), signed_statement("cd" * 32, "file", 10)}) == 4


def test_folder_tar_is_deterministic_and_survives_unpacking(tmp_path):
    one = make_folder(tmp_path / "one", mtime=1_000_000)
    two = make_folder(tmp_path / "two", mtime=2_000_000)
    assert folder_digest(one) == folder_digest(two)
    with open(tmp_path / "one.tar", "wb") as out:
        write_folder_tar(one, out)
    sha256, kind, size = artifact_digest(tmp_path / "one.tar")
    assert (sha256, size) == folder_digest(one) and kind == "file"
    with tarfile.open(tmp_path / "one.tar") as tar:
        assert tar.getnames() == ["a.txt", "empty", "sub", "sub/b.bin"]
        assert {m.mtime for m in tar.getmembers()} == {0} and {m.uname for m in tar.getmembers()} == {""}
    unpack_folder(tmp_path / "one.tar", tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "b.bin").read_bytes() == (one / "sub" / "b.bin").read_bytes()
    assert artifact_digest(tmp_path / "copy") == (sha256, "folder", size)


def test_links_are_not_packed(tmp_path):
    folder = make_folder(tmp_path / "f", mtime=0)
    (folder / "link").symlink_to(folder / "a.txt")
    with pytest.raises(ArtifactError, match="link: not a plain file or folder"):
        folder_digest(folder)


def test_unpack_refuses_links_and_non_tars(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        link = tarfile.TarInfo("passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(ArtifactError, match="member 'passwd' is not a plain file or folder"):
        unpack_folder(tmp_path / "evil.tar", tmp_path / "out")
    with pytest.raises(ArtifactError, match="x.txt: not a folder artifact"):
        unpack_folder(tmp_path / "x.txt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.tar", "x.txt"]  # no half-unpacked folder left
