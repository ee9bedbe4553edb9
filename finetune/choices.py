"""The accepted values of the run config's choice fields, torch-free.

`FedsiteConfig.validate` checks against these and `fedsite simulate --help` lists them, so the
help and the check cannot drift apart; importing this module costs nothing (the command line's
`--help` must not load torch). Aggregation rules are `aggregation.rules.RULES` (numpy only).
"""

from __future__ import annotations

import re

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # finetune/device.py maps them to torch dtypes
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

# what emulator distillation matches (emulator/distill.py); the last is the default
DISTILL_OBJECTIVES = ("logits", "hidden", "logits+hidden")

# aggregation rules whose update lands in the frozen base weights (finetune/base_delta.py)
BASE_RULES = ("fedex-lora", "flora")

# field (kebab key) -> accepted values, for the fields whose values are a closed set
CHOICES: dict[str, tuple[str, ...]] = {
    "partitioning": ("iid", "dirichlet", "shards"),
    "upload-codec": ("fp32", "fp16", "int8", "4bit", "adaptive"),
    "client-selection": ("uniform", "energy-aware"),
    "selection-objective": ("carbon", "energy"),
    "module-selection": ("all", "kill-revive"),  # Kill-and-Revive (coordinator/module_selection.py)
    "kr-score": ("update-norm", "update-rms", "gradient"),  # gradient: each client's first-step gradient norm per module
    "kr-assign": ("shared", "per-client"),  # one selection per round, or one per client from its own updates
    "kr-prior": ("none", "federation"),  # per-client: how a client ranks the modules it has not scored yet
    "dp": ("none", "local", "client"),
    "quantize": ("none", "nf4", "int8"),
    "emulator-quantize": ("none", "int8", "nf4"),
    "emulator-fill": ("drop", "share"),
    "emulator-select": ("stride", "similarity"),  # which middle blocks an emulator keeps (emulator/similarity.py)  # what an emulator does with the middle blocks it drops (emulator/layers.py)
    "emulator-distill-objective": DISTILL_OBJECTIVES,
    "offsite-train": ("lora", "lora-top", "blocks"),
    "dtype": DTYPE_CHOICES,
}


def valid_device_spec(spec: str) -> bool:
    """Whether `spec` is written as a device (availability is `resolve_device`'s business)."""
    return isinstance(spec, str) and bool(_SPEC.match(spec))


def one_of(values: tuple[str, ...]) -> str:
    """'a, b or c'."""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"
