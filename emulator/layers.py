"""The layer map of an offsite emulator: which backbone blocks it keeps, and in which role.

Offsite-Tuning (Xiao, Lin, Han 2023) splits the L transformer blocks of the backbone into
a trainable *adapter* at both ends (the first k and the last k blocks) and a frozen *middle*
that the emulator compresses. The middle is compressed by uniform layer drop with stride n:
of the middle blocks k .. L-k-1 the emulator keeps the first one and every n-th after it,
i.e. original indices k, k+n, k+2n, ... < L-k (`range(k, L - k, n)`). Stride 1 keeps the whole
middle (the emulator then equals the backbone); the last middle block is kept only when
(L-2k-1) is a multiple of n.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LayerMap:
    """Original block indices of a backbone with `num_layers` blocks, by role in the emulator."""

    num_layers: int
    bottom: tuple[int, ...]
    middle_kept: tuple[int, ...]
    top: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("bottom", "middle_kept", "top"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        L, k = self.num_layers, len(self.bottom)
        if k < 1 or len(self.top) != k:
            raise ValueError(f"layer map: bottom and top must hold the same k >= 1 blocks, got {k} and {len(self.top)}")
        if 2 * k >= L:
            raise ValueError(f"layer map: 2k must be < num_layers ({2 * k} >= {L})")
        if self.bottom != tuple(range(k)):
            raise ValueError(f"layer map: bottom must be the first k blocks {tuple(range(k))}, got {self.bottom}")
        if self.top != tuple(range(L - k, L)):
            raise ValueError(f"layer map: top must be the last k blocks {tuple(range(L - k, L))}, got {self.top}")
        middle = self.middle_kept
        if not middle or list(middle) != sorted(set(middle)) or middle[0] < k or middle[-1] >= L - k:
            raise ValueError(f"layer map: middle_kept must be increasing, non-empty and within [{k}, {L - k}), got {middle}")

    @property
    def k(self) -> int:
        """Adapter blocks at each end."""
        return len(self.bottom)

    def emulator_layers(self) -> tuple[int, ...]:
        """Original indices of the emulator's blocks, in emulator order (position i = block i)."""
        return self.bottom + self.middle_kept + self.top

    def adapter_layers(self) -> tuple[int, ...]:
        """Original indices of the trainable blocks (bottom then top)."""
        return self.bottom + self.top

    def dropped(self) -> tuple[int, ...]:
        """Original indices of the middle blocks that the emulator does not contain."""
        kept = set(self.middle_kept)
        return tuple(i for i in range(self.k, self.num_layers - self.k) if i not in kept)

    def emulator_index(self) -> dict[int, int]:
        """Original index -> position in the emulator, for every kept block."""
        return {orig: pos for pos, orig in enumerate(self.emulator_layers())}

    def middle_positions(self) -> tuple[int, ...]:
        """Emulator positions of the kept middle blocks."""
        return tuple(range(self.k, self.k + len(self.middle_kept)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "bottom": list(self.bottom),
            "middle_kept": list(self.middle_kept),
            "top": list(self.top),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerMap:
        missing = [key for key in ("num_layers", "bottom", "middle_kept", "top") if key not in data]
        if missing:
            raise ValueError(f"layer map: missing field '{missing[0]}'")
        return cls(int(data["num_layers"]), tuple(data["bottom"]), tuple(data["middle_kept"]), tuple(data["top"]))


def make_layer_map(num_layers: int, adapter_layers: int, stride: int) -> LayerMap:
    """k = `adapter_layers` trainable blocks at each end; keep middle blocks `range(k, L-k, stride)`."""
    L, k = int(num_layers), int(adapter_layers)
    if k < 1:
        raise ValueError(f"layer map: adapter_layers must be >= 1, got {k}")
    if 2 * k >= L:
        raise ValueError(f"layer map: 2*adapter_layers must be < num_layers ({2 * k} >= {L})")
    if stride < 1:
        raise ValueError(f"layer map: stride must be >= 1, got {stride}")
    return LayerMap(L, tuple(range(k)), tuple(range(k, L - k, stride)), tuple(range(L - k, L)))
