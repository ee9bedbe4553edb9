"""Device and dtype resolution (finetune/device.py), on whatever machine runs the tests: the
machine's CUDA is replaced by a stand-in where a test needs one present or absent."""

import pytest
import torch

from finetune.config import ConfigError, FedsiteConfig, from_mapping
from finetune.device import DeviceError, cast_frozen, placement, resolve_device, resolve_dtype, to_device, valid_device_spec


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture()
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.version, "cuda", "12.8")


def test_auto_is_the_first_cuda_gpu_else_the_cpu():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() and torch.cuda.device_count() else torch.device("cpu")
    assert resolve_device("auto") == expected and resolve_device() == expected


def test_auto_without_cuda_is_the_cpu_and_cpu_is_always_there(no_cuda):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_on_a_machine_without_it_is_one_line_naming_the_device(no_cuda, spec):
    with pytest.raises(DeviceError) as err:
        resolve_device(spec)
    message = str(err.value)
    assert f"device '{spec}' is not available on this machine" in message and "\n" not in message
    assert f"torch {torch.__version__}" in message


def test_cuda_n_parses_the_index_and_refuses_one_beyond_the_gpus(two_gpus):
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"device 'cuda:2' is not available on this machine \(.*2 CUDA devices: cuda:0\.\.cuda:1\)"):
        resolve_device("cuda:2")


def test_a_cuda_build_without_a_visible_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(DeviceError, match="CUDA 12.8, but no GPU is visible"):
        resolve_device("cuda")


def test_mps_unavailable_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"^device 'mps' is not available on this machine \(torch .*: no MPS\)$"):
        resolve_device("mps")


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", " cpu", "cpu:0", ""])
def test_malformed_devices_are_refused_by_name(spec):
    assert not valid_device_spec(spec)
    with pytest.raises(DeviceError, match="is not one of auto, cpu, cuda, cuda:N or mps"):
        resolve_device(spec)


def test_dtype_choice_table(monkeypatch):
    cpu, gpu, mps = torch.device("cpu"), torch.device("cuda", 0), torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", gpu) is torch.bfloat16
    assert resolve_dtype("auto", cpu) is torch.float32 and resolve_dtype("auto", mps) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100: fp32, not a silent fp16
    assert resolve_dtype("auto", gpu) is torch.float32
    for device in (cpu, gpu, mps):
        assert (resolve_dtype("fp32", device), resolve_dtype("bf16", device), resolve_dtype("fp16", device)) == (torch.float32, torch.bfloat16, torch.float16)
    with pytest.raises(DeviceError, match="dtype 'int4' is not one of auto, fp32, bf16, fp16"):
        resolve_dtype("int4", cpu)
    assert placement("cpu", "auto") == (cpu, torch.float32)


def test_config_fields_are_checked_and_settable_like_any_other():
    config = from_mapping({"device": "cuda:1", "dtype": "bf16", "gpus-per-worker": 0.25, "ray-address": "10.0.0.1:6379"})
    assert (config.device, config.dtype, config.gpus_per_worker, config.ray_address) == ("cuda:1", "bf16", 0.25, "10.0.0.1:6379")
    assert (FedsiteConfig().device, FedsiteConfig().dtype, FedsiteConfig().gpus_per_worker, FedsiteConfig().ray_address) == ("auto", "auto", 0.0, "")
    for key, value, expected in [("device", "gpu", "must be auto, cpu, cuda, cuda:N or mps"), ("dtype", "fp8", "must be auto, fp32, bf16, fp16"),
                                 ("gpus-per-worker", -0.5, "a finite number >= 0"), ("gpus-per-worker", float("inf"), "a finite number >= 0")]:
        with pytest.raises(ConfigError, match=f"config field '{key}' = .* {expected}"):
            from_mapping({key: value})


def test_cast_frozen_casts_only_frozen_weights_and_fp32_casts_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[0].requires_grad_(False)
    assert cast_frozen(model, torch.float32) == 0
    assert cast_frozen(model, torch.bfloat16) == 2
    assert model[0].weight.dtype is torch.bfloat16 and model[1].weight.dtype is torch.float32


def test_to_device_on_the_cpu_returns_the_same_tensors():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": None}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["input_ids"] is batch["input_ids"] and moved["attention_mask"] is None
