"""Kill-and-Revive on the client: train only the round's active LoRA modules, send only those.

The coordinator's selection (`protos.selection`, the train message's `active-modules`) is checked
against this adapter's own modules before anything changes; a selection that names a module the
adapter lacks, names one twice, or is not a list is refused (the client declines the round).
The factors of every other module get `requires_grad = False`: the optimizer holds no state for
them, and autograd records no graph below the lowest active module, so backward stops there.

With `kr-score = "gradient"` the client also measures every module's sensitivity to its data:
the first step's backward reaches every module's trainable factors (killed ones only for that
step, never stepped), and the reply's `kr-grad-norms` lists each module's gradient L2 norm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from peft import get_peft_model_state_dict

from protos.selection import GRAD_NORMS_KEY, decode_selection, module_of, modules_of, restrict, selectable


def probe_groups(model: torch.nn.Module, factors: str = "AB", lowest_block: int = 0) -> dict[str, list[torch.nn.Parameter]]:
    """Every LoRA module's factors to probe, by module name, sorted: those the run trains (FFA-LoRA
    only B), and B always (in RoLoRA's A rounds A's gradient is 0 wherever B still is). Modules
    below `lowest_block` (`kr-lowest-block`: never selectable, `protos.selection.selectable`) get no parameters, so their norm
    is 0 and the probe's backward still stops at that block."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        module = module_of(name)
        if module is None:
            continue
        group = groups.setdefault(module, [])
        if ("lora_A" in name and "A" in factors or "lora_B" in name) and selectable(module, lowest_block):
            group.append(param)
    return dict(sorted(groups.items()))


def grad_norms_metric(norms: Mapping[str, float]) -> dict[str, list[float]]:
    """The reply metric of a gradient probe: the norms in sorted module order (nothing without a
    probe, or when a norm is not finite: a low-precision overflow on a killed module must not cost
    the reply its update)."""
    values = [float(norms[m]) for m in sorted(norms)]
    return {GRAD_NORMS_KEY: values} if values and all(math.isfinite(v) for v in values) else {}


def apply_selection(model: torch.nn.Module, selection: object) -> list[str] | None:
    """Freeze the LoRA factors of the modules `selection` (the message's value, None = all)
    leaves out; the active modules, or None when every module trains. SelectionError if hostile."""
    if selection is None:
        return None
    active = decode_selection(selection, modules_of(get_peft_model_state_dict(model)))
    chosen = set(active)
    for name, param in model.named_parameters():
        module = module_of(name)
        if module is not None and module not in chosen:
            param.requires_grad = False
            param.grad = None  # a gradient left from a round it was active in: no memory, no optimizer step
    return active


def selected_update(trained: Mapping, active: list[str] | None) -> dict:
    """The arrays a reply carries: the active modules' factors only (everything without a selection)."""
    return dict(trained) if active is None else restrict(trained, active)
