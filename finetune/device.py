"""Where models run: the one `device` setting and the frozen backbone's `dtype`, resolved here.

`device` is "auto" (the first visible CUDA GPU, else the CPU), "cpu", "cuda", "cuda:N" or
"mps"; `resolve_device` turns it into a `torch.device` or raises `DeviceError`, a one-line
message naming the device and what this machine has. `dtype` is "auto" (bf16 on a CUDA GPU
that supports it, fp32 elsewhere), "fp32", "bf16" or "fp16" and applies to the frozen
backbone only: LoRA parameters, their optimizer state and every aggregate stay fp32.

Arrays cross the wire as numpy on the CPU; a model's inputs are moved to its device with
`to_device` (a no-op on the CPU: the tensors themselves are returned).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from finetune.choices import DEVICE_CHOICES, DTYPE_CHOICES, DTYPE_NAMES, valid_device_spec  # noqa: F401 (re-exported)

DTYPES: dict[str, torch.dtype] = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16)))


class DeviceError(ValueError):
    """A device that is malformed or not available on this machine; the message is one line."""


def _torch_build() -> str:
    return f"torch {torch.__version__}"


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _cuda_unavailable(spec: str) -> DeviceError:
    count = _cuda_count()
    if torch.version.cuda is None:
        why = "no CUDA"
    elif count == 0:
        why = f"CUDA {torch.version.cuda}, but no GPU is visible"
    else:
        why = f"{count} CUDA device{'s' if count > 1 else ''}: cuda:0" + (f"..cuda:{count - 1}" if count > 1 else "")
    return DeviceError(f"device '{spec}' is not available on this machine ({_torch_build()}: {why})")


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device `spec` names on this machine; DeviceError when it is malformed or absent."""
    if not valid_device_spec(spec):
        raise DeviceError(f"device {spec!r} is not one of {DEVICE_CHOICES}")
    if spec == "auto":
        return torch.device("cuda", 0) if _cuda_count() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise DeviceError(f"device 'mps' is not available on this machine ({_torch_build()}: no MPS)")
        return torch.device("mps")
    index = int(spec.partition(":")[2] or 0)
    if index >= _cuda_count():
        raise _cuda_unavailable(spec)
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """The frozen backbone's dtype: `spec`, or with "auto" bf16 on a CUDA GPU that has it, else fp32."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise DeviceError(f"dtype {spec!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def placement(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """(device, backbone dtype) of the specs, both resolved."""
    where = resolve_device(device)
    return where, resolve_dtype(dtype, where)


def accelerator_of(device: torch.device) -> tuple[str, float]:
    """(kind, memory in GB) of the accelerator `device` is: ("none", 0.0) for the CPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return "cuda", torch.cuda.get_device_properties(index).total_memory / 1e9
    if device.type == "mps":
        recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
        return "mps", (recommended() / 1e9) if callable(recommended) else 0.0
    return "none", 0.0


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's (first) parameter: where its inputs must go."""
    return next(model.parameters()).device


def to_device(batch: Mapping[str, torch.Tensor | None], device: torch.device) -> dict[str, torch.Tensor | None]:
    """`batch`'s tensors on `device` (the same tensor objects when they are already there)."""
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen floating-point parameters of `model` to `dtype`, in place; trainable ones
    (LoRA) stay as they are. Buffers (rotary frequencies) keep their dtype. Returns how many
    parameters were cast; fp32 to fp32 casts nothing."""
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast
