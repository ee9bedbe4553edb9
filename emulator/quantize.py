"""Weight-only quantization of the emulator's frozen middle, for storage in the package.

Only the Linear weights of the kept middle blocks are quantized, blockwise along the
flattened weight (64 values per block, one fp32 absmax each): "int8" is symmetric absmax
int8 (own 5 lines), "nf4" is bitsandbytes' 4-bit NormalFloat (`quantize_4bit`, works on
CPU). The package stores the quantized codes; loading dequantizes them back to fp32, so
the client computes in fp32 with the rounded weights. Both schemes are idempotent
(re-quantizing dequantized weights gives the same codes), which lets `build_emulator`
round the weights in memory and `write_package` store them without drift.
"""

from __future__ import annotations

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


def dequantize_tensor(parts: dict[str, torch.Tensor], method: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 weight of `shape` from `quantize_tensor`'s parts."""
    method = canonical(method)
    numel = int(torch.tensor(shape).prod()) if shape else 1
    if method == "int8":
        absmax = parts["absmax"].to(torch.float32)
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
        q = torch.zeros(absmax.numel() * BLOCK, dtype=torch.float32)
        q[:numel] = parts["q"].to(torch.float32)
        return (q.reshape(-1, BLOCK) * scale[:, None]).reshape(-1)[:numel].reshape(shape)
    import bitsandbytes.functional as bnbf

    state = bnbf.QuantState(
        absmax=parts["absmax"].to(torch.float32),
        shape=torch.Size(shape),
        code=bnbf.get_4bit_type("nf4", device="cpu"),
        blocksize=BLOCK,
        quant_type="nf4",
        dtype=torch.float32,
    )
    return bnbf.dequantize_4bit(parts["q"].reshape(-1, 1), state).to(torch.float32).reshape(shape)


def fake_quantize(weight: torch.Tensor, method: str) -> torch.Tensor:
    """The weight as the client will see it after storage: quantized, then dequantized."""
    return dequantize_tensor(quantize_tensor(weight, method), method, tuple(weight.shape))


def _blocks(w: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, BLOCK)
