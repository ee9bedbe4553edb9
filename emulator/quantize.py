"""Weight-only quantization of the emulator's frozen middle, for storage in the package.

Only the Linear weights of the kept middle blocks are quantized, blockwise along the
flattened weight (64 values per block, one fp32 absmax each): "int8" is symmetric absmax
int8 (own 5 lines), "nf4" is bitsandbytes' 4-bit NormalFloat (`quantize_4bit`, works on
CPU). The package stores the quantized codes; a client holds them as they are and dequantizes
one weight at a time when it runs (emulator/held.py), computing in fp32 with the rounded
weights. Both schemes are idempotent (re-quantizing dequantized weights gives the same
codes), which lets `build_emulator` round the weights in memory and `write_package` store them
without drift.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

BLOCK = 64
METHODS = ("int8", "nf4")
ALIASES = {"int8": "int8", "8bit": "int8", "nf4": "nf4", "4bit": "nf4"}


def canonical(method: str | None) -> str:
    """'' for none, else 'int8' or 'nf4' ('4bit' and '8bit' are accepted aliases)."""
    if method in (None, "", "none", "fp32"):
        return ""
    if method not in ALIASES:
        raise ValueError(f"quantize: unknown method '{method}' (expected none, int8, nf4 or 4bit)")
    return ALIASES[method]


def quantize_tensor(weight: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    """{'q': codes, 'absmax': per-block fp32 scales} for a float weight."""
    method = canonical(method)
    w = weight.detach().to(torch.float32).contiguous()
    if method == "int8":
        blocks = _blocks(w)
        absmax = blocks.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        q = torch.clamp(torch.round(blocks / scale[:, None]), -127, 127).to(torch.int8)
        return {"q": q.reshape(-1)[: w.numel()].contiguous(), "absmax": absmax}
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4")
    return {"q": q.reshape(-1).contiguous(), "absmax": state.absmax.to(torch.float32).contiguous()}


def dequantize_tensor(parts: Mapping[str, torch.Tensor], method: str, shape: tuple[int, ...], out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight of `shape` from `quantize_tensor`'s parts (on the codes' device), written
    into `out` (fp32, of `shape`) when given."""
    method = canonical(method)
    numel = math.prod(shape)
    device = parts["q"].device
    if method == "int8":
        absmax = parts["absmax"].to(torch.float32)
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        q = parts["q"].reshape(-1)
        if q.numel() == absmax.numel() * BLOCK:  # whole blocks: one pass, no temporaries
            out = torch.empty(shape, dtype=torch.float32, device=device) if out is None else out
            torch.mul(q.view(-1, BLOCK), scale[:, None], out=out.view(-1, BLOCK))
            return out
        q = torch.cat([q, q.new_zeros(absmax.numel() * BLOCK - q.numel())])  # the last block is short
        weight = (q.reshape(-1, BLOCK).to(torch.float32) * scale[:, None]).reshape(-1)[:numel].reshape(shape)
        return weight if out is None else out.copy_(weight)
    import bitsandbytes.functional as bnbf

    state = bnbf.QuantState(
        absmax=parts["absmax"].to(torch.float32),
        shape=torch.Size(shape),
        code=_nf4_code(device),
        blocksize=BLOCK,
        quant_type="nf4",
        dtype=torch.float32,
    )
    weight = bnbf.dequantize_4bit(parts["q"].reshape(-1, 1), state).to(torch.float32).reshape(shape)  # no CPU kernel with out=
    return weight if out is None else out.copy_(weight)


@functools.lru_cache(maxsize=None)
def _nf4_code(device: torch.device) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device=device)


def check_parts(parts: Mapping[str, torch.Tensor], method: str, shape: tuple[int, ...], name: str = "weight") -> None:
    """ValueError unless `parts` are codes `quantize_tensor(method)` gives for a weight of `shape`."""
    method = canonical(method)
    numel = math.prod(shape)
    blocks = -(-numel // BLOCK)
    q, absmax = parts.get("q"), parts.get("absmax")
    if not isinstance(q, torch.Tensor) or not isinstance(absmax, torch.Tensor):
        raise ValueError(f"{name}: codes or absmax missing")
    want_dtype, want_q = (torch.int8, numel) if method == "int8" else (torch.uint8, -(-numel // 2))
    if q.dim() != 1 or absmax.dim() != 1:
        raise ValueError(f"{name}: codes and absmax must be flat, got shapes {tuple(q.shape)} and {tuple(absmax.shape)}")
    if q.dtype != want_dtype or q.numel() != want_q:
        raise ValueError(f"{name}: {q.numel()} {q.dtype} codes, expected {want_q} {want_dtype} for shape {tuple(shape)}")
    if absmax.dtype != torch.float32 or absmax.numel() != blocks or not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"{name}: absmax must be {blocks} finite float32 values")


def fake_quantize(weight: torch.Tensor, method: str) -> torch.Tensor:
    """The weight as the client will see it after storage: quantized, then dequantized."""
    return dequantize_tensor(quantize_tensor(weight, method), method, tuple(weight.shape))


def _blocks(w: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, BLOCK)
