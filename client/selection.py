"""Kill-and-Revive on the client: train only the round's active LoRA modules, send only those.

The coordinator's selection (`protos.selection`, the train message's `active-modules`) is checked
against this adapter's own modules before anything changes; a selection that names a module the
adapter lacks, names one twice, or is not a list is refused (the client declines the round).
The factors of every other module get `requires_grad = False`: the optimizer holds no state for
them, and autograd records no graph below the lowest active module, so backward stops there.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import get_peft_model_state_dict

from protos.selection import decode_selection, module_of, modules_of, restrict


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
