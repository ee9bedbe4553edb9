"""The emulator's frozen middle held as its stored codes: int8/NF4 in memory, not fp32.

A quantized package stores each middle Linear weight as codes + per-block absmax
(emulator/quantize.py). A client used to dequantize them all to fp32 on load, so its emulator
took the backbone's memory per kept block. `QuantizedLinear` keeps the codes and dequantizes
one weight at a time, inside its forward and again inside its backward (the fp32 weight is
never saved for the backward pass), so only the codes stay resident. The math is the same as
loading the dequantized weight: the same fp32 weight enters the same `F.linear`. Each thread
dequantizes into one scratch tensor per weight shape (about 12 MB in all on SmolLM2), reused by
every layer: fresh W-sized tensors per layer and step would fragment the heap.

It is an `nn.Linear` (for code that finds the middle's Linears, e.g. emulator/refresh.py) whose
`weight` is a read-only, freshly dequantized tensor; the codes never train.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from emulator.quantize import check_parts, dequantize_tensor


class _CodesMatmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized from codes in forward and backward, never saved."""

    @staticmethod
    def forward(ctx, x, q, absmax, bias, method, shape):  # type: ignore[override]
        ctx.save_for_backward(q, absmax)
        ctx.method, ctx.shape = method, shape
        return F.linear(x, _scratch_weight(q, absmax, method, shape, x.dtype), bias)

    @staticmethod
    @once_differentiable  # the scratch weight must not enter a graph: no double backward
    def backward(ctx, grad):  # type: ignore[override]
        q, absmax = ctx.saved_tensors
        grad_x = grad @ _scratch_weight(q, absmax, ctx.method, ctx.shape, grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None, None


_scratch = threading.local()


def _scratch_weight(q: torch.Tensor, absmax: torch.Tensor, method: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The weight dequantized into this thread's scratch tensor of `shape`: valid until the
    next call with that shape, so it is consumed at once and never saved."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (shape, q.device)
    if key not in buffers:
        buffers[key] = torch.empty(shape, dtype=torch.float32, device=q.device)
    return dequantize_tensor({"q": q, "absmax": absmax}, method, shape, out=buffers[key]).to(dtype)


class Codes(nn.Module):
    """The codes of one weight (buffers `q`, `absmax`). A module of its own so that the slots of a
    fill-"share" emulator share one (emulator/build.py `_alias`), which `.to(device)` then moves
    once; the absmax stays fp32 whatever dtype the model is cast to."""

    def __init__(self, q: torch.Tensor, absmax: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("absmax", absmax)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        absmax = self.absmax
        super()._apply(fn, recurse)
        if self.absmax.dtype != torch.float32:  # a dtype cast of the model: scales are not weights
            self.absmax = absmax.to(device=self.absmax.device)
        return self


class QuantizedLinear(nn.Linear):
    """A frozen Linear whose weight lives as `quantize_tensor` codes (child `codes`)."""

    def __init__(self, linear: nn.Linear, parts: Mapping[str, torch.Tensor], method: str) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate an fp32 weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.method = method
        self.codes = Codes(parts["q"], parts["absmax"])
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The fp32 weight, dequantized anew at every read (a copy: writing to it changes nothing)."""
        return dequantize_tensor({"q": self.codes.q, "absmax": self.codes.absmax}, self.method, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _CodesMatmul.apply(x, self.codes.q, self.codes.absmax, self.bias, self.method, (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, held={self.method}"


def hold_quantized(model: nn.Module, codes: Mapping[str, Mapping[str, torch.Tensor]], method: str) -> None:
    """Replace each Linear named by `codes` (state-dict name of its weight, e.g.
    'model.layers.3.mlp.up_proj.weight') with a QuantizedLinear holding those codes, in place.
    Malformed codes (wrong dtype or count for the Linear's shape) raise ValueError."""
    for name, parts in codes.items():
        if not name.endswith(".weight"):
            raise ValueError(f"held codes: '{name}' is not a weight")
        path = name[: -len(".weight")]
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child, None)
        if not isinstance(linear, nn.Linear) or isinstance(linear, QuantizedLinear):
            raise ValueError(f"held codes: '{path}' is not a plain Linear")
        check_parts(parts, method, (linear.out_features, linear.in_features), name)
        setattr(parent, child, QuantizedLinear(linear, parts, method))
