"""The device options at the front door: `--device`, `--dtype`, `--gpus-per-worker`, `--ray-address`
(simulate, coordinator), `fedsite client --device` and `fedsite emulator build --device`. A
device this machine lacks is one line naming it, before anything starts (CUDA is made absent
here, so the tests say the same on a machine that has it)."""

import sys

import pytest
import torch

from fedsite.cli import build_parser, config_from_args, main


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedsite: error")]


def test_simulate_on_cuda_without_it_exits_with_one_line_naming_the_device_before_ray_starts(tmp_path, capsys, no_cuda):
    out = tmp_path / "run"
    assert main(["simulate", "--model", "tiny", "--clients", "4", "--rounds", "1", "--device", "cuda", "--out", str(out)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("fedsite: error: device 'cuda' is not available on this machine ("), lines
    assert not out.exists()
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_a_gpu_share_on_a_machine_without_gpus_is_one_line_before_ray_starts(tmp_path, capsys, no_cuda, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["simulate", "--model", "tiny", "--device", "cpu", "--gpus-per-worker", "0.25", "--out", str(tmp_path / "run")]) == 2
    assert error_lines(capsys) == ["fedsite: error: gpus-per-worker 0.25 needs a CUDA GPU, and this machine has none (run on a Ray cluster with GPUs via --ray-address, or set gpus-per-worker 0)"]


def test_device_options_reach_the_run_config():
    args = build_parser().parse_args(["simulate", "--device", "cuda:1", "--dtype", "bf16", "--gpus-per-worker", "0.25", "--ray-address", "10.0.0.2:6379"])
    config = config_from_args(args)
    assert (config.device, config.dtype, config.gpus_per_worker, config.ray_address) == ("cuda:1", "bf16", 0.25, "10.0.0.2:6379")
    coordinator = config_from_args(build_parser().parse_args(["coordinator", "--insecure", "--no-auth", "--device", "cpu"]))
    assert coordinator.device == "cpu"  # central evaluation's device
    client = build_parser().parse_args(["client", "--coordinator", "h:1", "--data", "d.jsonl", "--device", "mps"])
    assert client.device == "mps"


def test_coordinator_on_cuda_without_it_is_one_line_before_anything_starts(tmp_path, capsys, no_cuda):
    code = main(["coordinator", "--insecure", "--no-auth", "--address", "127.0.0.1:9", "--device", "cuda", "--out", str(tmp_path / "run")])
    assert code == 2 and error_lines(capsys) == [f"fedsite: error: device 'cuda' is not available on this machine (torch {torch.__version__}: no CUDA)"]
    assert not (tmp_path / "run").exists()


def test_client_on_cuda_without_it_is_one_line(tmp_path, capsys, no_cuda):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    assert main(["client", "--coordinator", "127.0.0.1:9", "--data", str(data), "--insecure", "--device", "cuda:0"]) == 2
    assert error_lines(capsys)[0].startswith("fedsite: error: device 'cuda:0' is not available on this machine")


def test_emulator_build_on_cuda_without_it_builds_nothing(tmp_path, capsys, no_cuda):
    assert main(["emulator", "build", "--model", "tiny", "--out", str(tmp_path / "pkg"), "--device", "cuda"]) == 2
    assert error_lines(capsys)[0].startswith("fedsite: error: device 'cuda' is not available")
    assert not (tmp_path / "pkg").exists()
