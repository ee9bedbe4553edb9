"""The layer map of an offsite emulator: which backbone blocks it keeps, and in which role.

Offsite-Tuning (Xiao, Lin, Han 2023) splits the L transformer blocks of the backbone into
a trainable *adapter* at both ends (the first k and the last k blocks) and a frozen *middle*
that the emulator compresses. The middle is compressed by uniform layer drop with stride n:
of the middle blocks k .. L-k-1 the emulator keeps the first one and every n-th after it,
i.e. original indices k, k+n, k+2n, ... < L-k (`range(k, L - k, n)`). Stride 1 keeps the whole
middle (the emulator then equals the backbone); the last middle block is kept only when
(L-2k-1) is a multiple of n. A keep share instead (FedBiOT's mild compression: 0.8 drops 20%)
keeps that share of the middle, evenly spaced, its first and last block included.

Fill: with "drop" (the paper's) the dropped blocks are simply gone and the emulator is
shallower. With "share" (CRaSh, Zhang et al. 2023) the emulator keeps the backbone's depth:
every dropped slot runs a copy of its nearest kept middle block (ties go to the earlier
one), sharing that block's weights. `slots` then lists, for each of the L slots, the original
index of the block it runs; the package still stores each kept block once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune.config import EMULATOR_FILLS as FILLS


@dataclass(frozen=True)
class LayerMap:
    """Original block indices of a backbone with `num_layers` blocks, by role in the emulator."""

    num_layers: int
    bottom: tuple[int, ...]
    middle_kept: tuple[int, ...]
    top: tuple[int, ...]
    fill: str = "drop"
    slots: tuple[int, ...] = ()  # fill "share": source block of each of the num_layers slots

    def __post_init__(self) -> None:
        for name in ("bottom", "middle_kept", "top", "slots"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        object.__setattr__(self, "fill", self.fill or "drop")
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
        if self.fill not in FILLS:
            raise ValueError(f"layer map: fill must be one of {', '.join(FILLS)}, got {self.fill!r}")
        if self.fill == "drop" and self.slots:
            raise ValueError("layer map: slots are only for fill 'share'")
        if self.fill == "share":
            self._check_slots()

    def _check_slots(self) -> None:
        """Every slot runs a kept block; adapter and kept middle blocks run in their own slot;
        a dropped slot runs a kept middle block (never an adapter: those train)."""
        L, slots, kept = self.num_layers, self.slots, set(self.middle_kept)
        if len(slots) != L:
            raise ValueError(f"layer map: fill 'share' needs one slot per block ({L}), got {len(slots)}")
        for slot, source in enumerate(slots):
            own = slot in kept or slot in self.bottom or slot in self.top
            if (own and source != slot) or (not own and source not in kept):
                want = "itself" if own else f"a kept middle block {tuple(sorted(kept))}"
                raise ValueError(f"layer map: slot {slot} runs block {source}, must run {want}")
    @property
    def k(self) -> int:
        """Adapter blocks at each end."""
        return len(self.bottom)

    def emulator_layers(self) -> tuple[int, ...]:
        """Original indices of the blocks the emulator stores (each once), in stored order.

        With fill "drop" this is also the emulator's stack (position i = block i); with "share"
        the stack has all `num_layers` slots (`stack()`)."""
        return self.bottom + self.middle_kept + self.top

    def stack(self) -> tuple[int, ...]:
        """Original index of the block at each position of the emulator's stack, as it runs."""
        return self.slots if self.fill == "share" else self.emulator_layers()

    def compact(self) -> LayerMap:
        """The same kept blocks with fill "drop": the layout the package stores."""
        return LayerMap(self.num_layers, self.bottom, self.middle_kept, self.top)

    def adapter_layers(self) -> tuple[int, ...]:
        """Original indices of the trainable blocks (bottom then top)."""
        return self.bottom + self.top

    def dropped(self) -> tuple[int, ...]:
        """Original indices of the middle blocks that the emulator does not contain."""
        kept = set(self.middle_kept)
        return tuple(i for i in range(self.k, self.num_layers - self.k) if i not in kept)

    def emulator_index(self) -> dict[int, int]:
        """Original index -> position in the emulator, for every kept block (its own slot when shared)."""
        if self.fill == "share":
            return {orig: orig for orig in self.emulator_layers()}
        return {orig: pos for pos, orig in enumerate(self.emulator_layers())}

    def middle_positions(self) -> tuple[int, ...]:
        """Emulator positions of the kept middle blocks (the slots that own their weights)."""
        return tuple(self.emulator_index()[i] for i in self.middle_kept)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "num_layers": self.num_layers,
            "bottom": list(self.bottom),
            "middle_kept": list(self.middle_kept),
            "top": list(self.top),
        }
        if self.fill == "share":
            data.update(fill="share", slots=list(self.slots))
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerMap:
        missing = [key for key in ("num_layers", "bottom", "middle_kept", "top") if key not in data]
        if missing:
            raise ValueError(f"layer map: missing field '{missing[0]}'")
        return cls(int(data["num_layers"]), tuple(data["bottom"]), tuple(data["middle_kept"]), tuple(data["top"]),
                   str(data.get("fill", "drop")), tuple(data.get("slots", ())))


def nearest_slots(num_layers: int, adapter_layers: int, middle_kept: tuple[int, ...]) -> tuple[int, ...]:
    """Fill "share": each slot runs itself if kept, else the nearest kept middle block (ties: the earlier)."""
    L, k = num_layers, adapter_layers
    kept = set(middle_kept) | set(range(k)) | set(range(L - k, L))
    return tuple(i if i in kept else min(middle_kept, key=lambda m: (abs(m - i), m)) for i in range(L))


def evenly_kept(first: int, end: int, keep: float) -> tuple[int, ...]:
    """round(keep x M) of the M blocks first .. end-1, evenly spaced, the first and the last
    included: keep 0.8 drops every fifth block, as FedBiOT's 20% drop. At least one is kept, and
    keep < 1 drops at least one (a shallow middle would otherwise round to the whole backbone)."""
    M = end - first
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"layer map: keep must be in (0, 1], got {keep}")
    count = max(1, min(M if keep >= 1.0 else M - 1, int(keep * M + 0.5)))
    if count == 1:
        return (first,)
    return tuple(first + int(i * (M - 1) / (count - 1) + 0.5) for i in range(count))


def make_layer_map(num_layers: int, adapter_layers: int, stride: int, fill: str = "drop", keep: float = 0.0) -> LayerMap:
    """k = `adapter_layers` trainable blocks at each end; keep middle blocks `range(k, L-k, stride)`,
    or with `keep` > 0 that share of them evenly spaced (`evenly_kept`); with `fill` "share"
    every dropped slot runs its nearest kept middle block."""
    L, k = int(num_layers), int(adapter_layers)
    if k < 1:
        raise ValueError(f"layer map: adapter_layers must be >= 1, got {k}")
    if 2 * k >= L:
        raise ValueError(f"layer map: 2*adapter_layers must be < num_layers ({2 * k} >= {L})")
    if stride < 1:
        raise ValueError(f"layer map: stride must be >= 1, got {stride}")
    if fill not in FILLS:
        raise ValueError(f"layer map: fill must be one of {', '.join(FILLS)}, got {fill!r}")
    middle = evenly_kept(k, L - k, keep) if keep else tuple(range(k, L - k, stride))
    slots = nearest_slots(L, k, middle) if fill == "share" else ()
    return LayerMap(L, tuple(range(k)), middle, tuple(range(L - k, L)), fill, slots)
