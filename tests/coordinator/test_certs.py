"""Certificates and keys: owner-only from the first byte, no symbolic link followed, nothing
overwritten without --force (and then replaced atomically)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from coordinator import certs, files
from coordinator.certs import CertError, write_certs, write_node_key
from fedsite.cli import main

KEYS = ("ca.key", "server.key")
PUBLIC = ("ca.crt", "server.pem")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture()
def opened(monkeypatch):
    """Every os.open of coordinator.files, with its flags and mode, under a umask of 0 (so the
    modes come from the code, not from the umask), and no chmod allowed anywhere."""
    calls: list[tuple[str, int, int]] = []
    real_open = os.open

    def recording(path, flags, mode=0o777, *args, **kwargs):
        calls.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    def no_chmod(*args, **kwargs):
        raise AssertionError("a file was created first and chmodded afterwards")

    monkeypatch.setattr(files.os, "open", recording)  # files.os is the os module: these are global for the test
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    old = os.umask(0)
    yield calls
    os.umask(old)


def test_private_keys_are_created_owner_only_exclusively_and_never_through_a_link(tmp_path, opened):
    write_certs(tmp_path)
    private, public = write_node_key(tmp_path / "clients", "client-1")
    created = {Path(path).name: (flags, m) for path, flags, m in opened if flags & os.O_CREAT}
    wanted = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    for name in (*KEYS, "client-1"):
        flags, m = created[f".{name}.tmp"]
        assert flags & wanted == wanted and m == 0o600, name
    for name in (*PUBLIC, "client-1.pub"):
        flags, m = created[f".{name}.tmp"]
        assert flags & wanted == wanted and m == 0o644, name
    for path in [tmp_path / k for k in KEYS] + [private]:
        assert mode(path) == 0o600, path
    assert mode(tmp_path / "ca.crt") == mode(public) == 0o644
    assert not list(tmp_path.rglob(".*.tmp"))


def test_an_existing_ca_is_refused_without_force_and_nothing_changes(tmp_path):
    write_certs(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(CertError) as err:
        write_certs(tmp_path)
    message = str(err.value)
    assert "\n" not in message and f"{tmp_path / 'ca.crt'} already exists (a CA made earlier: with --force, clients must then trust the new ca.crt)" in message
    assert "pass --force" in message and "another --out" in message
    (tmp_path / "ca.crt").unlink()  # the key alone is a CA too
    with pytest.raises(CertError, match="ca.key already exists"):
        write_certs(tmp_path)
    assert snapshot(tmp_path) == {k: v for k, v in before.items() if k != "ca.crt"}


def test_force_replaces_the_ca_atomically_and_owner_only(tmp_path):
    old = write_certs(tmp_path)
    old_ca = old.ca_cert.read_bytes()
    new = write_certs(tmp_path, ["coord.example.org"], force=True)
    assert new.ca_cert.read_bytes() != old_ca
    ca = x509.load_pem_x509_certificate(new.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(new.server_cert.read_bytes()).verify_directly_issued_by(ca)
    assert all(mode(tmp_path / k) == 0o600 for k in KEYS) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("name", [*KEYS, *PUBLIC])
def test_a_planted_link_is_refused_and_its_target_untouched(tmp_path, name):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    out = tmp_path / "certs"
    out.mkdir()
    (out / name).symlink_to(victim)
    with pytest.raises(CertError) as err:
        write_certs(out)
    assert f"{out / name} is a symbolic link; refusing to write through it" in str(err.value) and "\n" not in str(err.value)
    assert victim.read_text() == "keep me" and (out / name).is_symlink()
    assert [p.name for p in out.iterdir()] == [name]  # nothing else was written either
    (out / name).unlink()
    (out / name).symlink_to(tmp_path / "dangling")  # a dangling link is refused as well
    with pytest.raises(CertError, match="is a symbolic link"):
        write_certs(out)
    assert not (tmp_path / "dangling").exists()


def test_with_force_a_link_is_replaced_itself_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    out = tmp_path / "certs"
    out.mkdir()
    (out / "ca.key").symlink_to(victim)
    write_certs(out, force=True)
    assert victim.read_text() == "keep me"
    assert not (out / "ca.key").is_symlink() and mode(out / "ca.key") == 0o600


def test_a_link_planted_at_the_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    out = tmp_path / "certs"
    out.mkdir()
    files.temporary_path(out / "ca.key").symlink_to(victim)
    write_certs(out)
    assert victim.read_text() == "keep me" and mode(out / "ca.key") == 0o600


def test_a_file_that_appears_between_check_and_write_is_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(certs, "refuse_existing", lambda paths, force: None)  # lose the race on purpose
    (tmp_path / "ca.key").write_text("someone else's key")
    with pytest.raises(CertError, match="ca.key already exists"):
        certs.write_certs(tmp_path)
    assert (tmp_path / "ca.key").read_text() == "someone else's key"


def test_node_keys_are_not_overwritten_without_force(tmp_path):
    private, public = write_node_key(tmp_path, "client-1")
    before = snapshot(tmp_path)
    with pytest.raises(CertError, match="client-1 already exists"):
        write_node_key(tmp_path, "client-1")
    assert snapshot(tmp_path) == before
    write_node_key(tmp_path, "client-1", force=True)
    assert private.read_bytes() != before["client-1"] and mode(private) == 0o600


def test_cli_certs_refuses_a_second_run_in_one_line_and_force_replaces_everything(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--clients", "2"]) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert main(["certs", "--out", str(tmp_path), "--clients", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedsite: error: certs: ") and "--force" in err and "\n" not in err
    assert snapshot(tmp_path) == before

    (tmp_path / "ca.crt").unlink()
    (tmp_path / "ca.key").unlink()
    (tmp_path / "server.pem").unlink()
    (tmp_path / "server.key").unlink()
    assert main(["certs", "--out", str(tmp_path), "--clients", "2"]) == 2  # a client key is in the way: no new CA either
    assert "client-1 already exists" in capsys.readouterr().err
    assert not (tmp_path / "ca.key").exists()

    assert main(["certs", "--out", str(tmp_path), "--clients", "2", "--force"]) == 0
    after = snapshot(tmp_path)
    assert set(after) == set(before) and all(after[k] != before[k] for k in ("clients/client-1", "clients/client-2"))
    assert all(mode(tmp_path / k) == 0o600 for k in (*KEYS, "clients/client-1", "clients/client-2"))
