"""The simulation runner's own bookkeeping and its Ray backend settings (the federation itself is covered by the *_e2e tests)."""

import os

import pytest

from client.state import STATE_ENV
from finetune.config import FedsiteConfig
from finetune.device import DeviceError
from simulations import runner
from simulations.runner import backend_config, check_placement, client_state_dir


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


# ------------------------------------------------------------------ Ray backend from the config


@pytest.fixture()
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_a_private_ray_gets_the_workers_cpus_and_no_gpu_by_default(no_ray_address):
    assert backend_config(FedsiteConfig(workers=3)) == {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 3, "include_dashboard": False},
    }


def test_gpus_per_worker_goes_into_the_client_resources_and_ray_gets_the_gpus(no_ray_address):
    config = backend_config(FedsiteConfig(workers=4, gpus_per_worker=0.25), gpus=1)
    assert config["client_resources"] == {"num_cpus": 1, "num_gpus": 0.25}
    assert config["init_args"] == {"num_cpus": 4, "include_dashboard": False, "num_gpus": 1}


@pytest.mark.parametrize("workers, gpus, share", [(4, 1, 0.25), (3, 2, 0.6666), (2, 4, 1.0), (2, 0, 0.0)])
def test_auto_shares_the_visible_gpus_among_the_workers(no_ray_address, workers, gpus, share):
    assert backend_config(FedsiteConfig(workers=workers), gpus=gpus)["client_resources"]["num_gpus"] == share


@pytest.mark.parametrize("where", ["option", "environment"])
def test_a_ray_address_joins_the_cluster_as_it_is(monkeypatch, where):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if where == "environment":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    config = FedsiteConfig(workers=8, gpus_per_worker=0.5, ray_address="10.0.0.1:6379" if where == "option" else "")
    # ray.init refuses resource counts when it connects: the cluster's nodes bring their own
    assert backend_config(config, gpus=0) == {"client_resources": {"num_cpus": 1, "num_gpus": 0.5}, "init_args": {"address": "10.0.0.1:6379"}}
    assert backend_config(config.replace(gpus_per_worker=0.0), gpus=4)["client_resources"]["num_gpus"] == 0.0  # no auto share on a cluster


def test_placement_errors_come_before_ray_starts_in_one_line(no_ray_address, monkeypatch):
    monkeypatch.setattr(runner, "torch_cuda_count", lambda: 0)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert check_placement(FedsiteConfig(device="cpu")) == 0
    with pytest.raises(DeviceError, match=r"^gpus-per-worker 0.25 needs a CUDA GPU, and this machine has none"):
        check_placement(FedsiteConfig(device="cpu", gpus_per_worker=0.25))
    with pytest.raises(DeviceError, match=r"^device 'cuda' is not available on this machine"):
        check_placement(FedsiteConfig(device="cuda"))
    with pytest.raises(DeviceError, match="must be a share in"):
        check_placement(FedsiteConfig(device="cpu", gpus_per_worker=1.5, ray_address="10.0.0.1:6379"))
    with pytest.raises(DeviceError, match="on a Ray cluster needs gpus-per-worker > 0"):
        check_placement(FedsiteConfig(device="cuda", ray_address="10.0.0.1:6379"))
