"""The simulation runner's own bookkeeping (the federation itself is covered by the *_e2e tests)."""

import os

from client.state import STATE_ENV
from simulations.runner import client_state_dir


def test_simulated_client_state_lives_in_a_folder_removed_after_the_run(monkeypatch):
    monkeypatch.delenv(STATE_ENV, raising=False)
    with client_state_dir() as path:
        assert os.environ[STATE_ENV] == str(path) and path.is_dir()
        (path / "run-1").mkdir()
        (path / "run-1" / "0-error-feedback.safetensors").write_bytes(b"residual")
    assert not path.exists() and STATE_ENV not in os.environ


def test_a_folder_the_user_named_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv(STATE_ENV, str(tmp_path))
    (tmp_path / "keep").write_text("x")
    with client_state_dir() as path:
        assert path is None and os.environ[STATE_ENV] == str(tmp_path)
    assert (tmp_path / "keep").is_file() and os.environ[STATE_ENV] == str(tmp_path)


def test_the_folder_is_removed_when_the_run_fails(monkeypatch):
    monkeypatch.delenv(STATE_ENV, raising=False)
    try:
        with client_state_dir() as path:
            raise RuntimeError("simulation failed")
    except RuntimeError:
        pass
    assert not path.exists() and STATE_ENV not in os.environ
