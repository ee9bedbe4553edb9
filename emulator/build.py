"""Build an offsite emulator from a Llama-family backbone, and plug trained adapters back in.

The emulator is a standalone causal LM of the same class: deep copies of the embeddings,
final norm and lm_head, the 2k adapter blocks and only the kept middle blocks, renumbered
0..n-1 (attention `layer_idx` fixed so the KV cache works). Its adapter blocks trainable,
everything else frozen. Adapter weights travel as named arrays keyed by ORIGINAL block
index (`model.layers.29.mlp.down_proj.weight`), so the coordinator can aggregate them and
load them into the full model without knowing emulator positions.

Fill "share" (CRaSh) keeps the backbone's depth: the stack gets all L slots, a dropped slot
running a distinct module object that shares its source block's parameters (`expand_shared`),
with its own `layer_idx` (Llama's KV cache is indexed by it, so one module in two slots would
break `generate()`). Adapter positions then equal original indices, as in the full model.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from emulator.held import Codes
from emulator.layers import LayerMap
from emulator.quantize import canonical, fake_quantize
from finetune.lora import LoraSettings

LAYER_PREFIX = "model.layers."


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer blocks of a Llama-family causal LM (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"emulator: {type(model).__name__} is not a Llama-family causal LM (no model.layers)")
    return layers


def build_emulator(model: PreTrainedModel, layer_map: LayerMap, *, quantize: str | None = None) -> PreTrainedModel:
    """A new model with only `layer_map.emulator_layers()`; the backbone is left untouched.

    `quantize` ("int8", "nf4"/"4bit") rounds the kept middle Linear weights as the package
    will store them (see `emulator.quantize`); distil first, then `quantize_middle`.
    """
    if isinstance(model, PeftModel):
        raise ValueError("emulator: build from the plain backbone, not a PeftModel")
    layers = decoder_layers(model)
    if len(layers) != layer_map.num_layers:
        raise ValueError(f"emulator: layer map is for {layer_map.num_layers} blocks, model has {len(layers)}")
    emulator = copy.deepcopy(model, {id(layers): nn.ModuleList()})  # everything but the blocks
    kept = [copy.deepcopy(layers[i]) for i in layer_map.emulator_layers()]
    for position, layer in enumerate(kept):
        _set_layer_idx(layer, position)
    emulator.model.layers = nn.ModuleList(kept)
    config = emulator.config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layer_map.emulator_layers()]
    config.emulator_quantization = ""
    config.emulator_distilled = False
    if layer_map.fill == "share":
        expand_shared(emulator, layer_map)
    freeze_non_adapter(emulator, layer_map)
    if canonical(quantize):
        quantize_middle(emulator, layer_map, quantize)
    return emulator.eval()


def _set_layer_idx(layer: nn.Module, position: int) -> None:
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = position


def _alias(layer: nn.Module, config: object) -> nn.Module:
    """A new module tree running `layer`'s own parameters, buffers and held codes (nothing is copied
    but the modules)."""
    memo = {id(t): t for t in itertools.chain(layer.parameters(), layer.buffers())}
    memo.update({id(m): m for m in layer.modules() if isinstance(m, Codes)})  # held codes: one module, moved once
    memo[id(config)] = config
    return copy.deepcopy(layer, memo)


def expand_shared(emulator: PreTrainedModel, layer_map: LayerMap) -> None:
    """Turn a compact emulator (one block per `emulator_layers()`) into the fill-"share" stack, in place.

    Slot i runs block `layer_map.slots[i]`: its own module if the block is kept there, else a
    distinct module object sharing the block's parameters, every module with `layer_idx` = slot.
    """
    if layer_map.fill != "share":
        raise ValueError("emulator: expand_shared needs a layer map with fill 'share'")
    layers, stored = decoder_layers(emulator), layer_map.emulator_layers()
    if len(layers) != len(stored):
        raise ValueError(f"emulator: a compact emulator has {len(stored)} blocks, this one {len(layers)}")
    home = dict(zip(stored, layers))
    config = emulator.config
    stack = [home[source] if slot == source else _alias(home[source], config) for slot, source in enumerate(layer_map.slots)]
    for slot, layer in enumerate(stack):
        _set_layer_idx(layer, slot)
    emulator.model.layers = nn.ModuleList(stack)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[stored.index(source)] for source in layer_map.slots]
    config.num_hidden_layers = len(stack)


def compact_view(emulator: PreTrainedModel, layer_map: LayerMap) -> PreTrainedModel:
    """A fill-"share" emulator as the package stores it: each kept block once, in `emulator_layers()`
    order, config of the compact stack. Shares every tensor with `emulator`; for writing only."""
    if layer_map.fill != "share":
        return emulator
    layers = decoder_layers(emulator)
    if len(layers) != layer_map.num_layers:
        raise ValueError(f"emulator: a shared emulator has {layer_map.num_layers} slots, this one {len(layers)}")
    memo = {id(t): t for t in itertools.chain(emulator.parameters(), emulator.buffers())}
    memo[id(layers)] = nn.ModuleList([layers[i] for i in layer_map.emulator_layers()])
    view = copy.deepcopy(emulator, memo)
    config = view.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layer_map.emulator_layers()]
    config.num_hidden_layers = len(layer_map.emulator_layers())
    return view


def freeze_non_adapter(emulator: PreTrainedModel, layer_map: LayerMap) -> None:
    """Only the adapter blocks train; embeddings, middle, norm and lm_head stay frozen."""
    adapters = {layer_map.emulator_index()[i] for i in layer_map.adapter_layers()}
    emulator.requires_grad_(False)
    for position, layer in enumerate(decoder_layers(emulator)):
        layer.requires_grad_(position in adapters)


def middle_linear_weights(emulator: PreTrainedModel, layer_map: LayerMap) -> dict[str, nn.Parameter]:
    """State-dict name -> weight of every Linear in the kept middle blocks (emulator positions)."""
    layers = decoder_layers(emulator)
    out = {}
    for position in layer_map.middle_positions():
        for name, module in layers[position].named_modules():
            if isinstance(module, nn.Linear):
                out[f"{LAYER_PREFIX}{position}.{name}.weight"] = module.weight
    return out


@torch.no_grad()
def quantize_middle(emulator: PreTrainedModel, layer_map: LayerMap, method: str) -> None:
    """Round the middle Linear weights in place to what `method` stores (compute stays fp32)."""
    method = canonical(method)
    if not method:
        return
    if emulator.config.emulator_quantization not in ("", method):
        raise ValueError(f"emulator: middle already quantized as {emulator.config.emulator_quantization}")
    for weight in middle_linear_weights(emulator, layer_map).values():
        weight.copy_(fake_quantize(weight, method))
    emulator.config.emulator_quantization = method


def attach_adapter_lora(model: PreTrainedModel, layer_map: LayerMap, settings: LoraSettings, seed: int = 0, *, top_only: bool = False) -> PeftModel:
    """LoRA (via PEFT) on the adapter blocks only (`top_only`: the top ones), for clients that
    train LoRA instead of full blocks.

    `model` is the emulator (client side) or the full backbone (the coordinator's plug-in):
    the same LoRA lands on the same original blocks, only their positions differ.
    """
    peft_config = settings.to_peft()
    positions = adapter_positions(model, layer_map)
    peft_config.layers_to_transform = sorted(p for original, p in positions.items() if not top_only or original in layer_map.top)
    peft_config.layers_pattern = "layers"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_config)


def _plain(model: PreTrainedModel, layer_map: LayerMap) -> PreTrainedModel:
    """`model` itself, or for a PeftModel a merged copy (LoRA outside the adapter blocks is an error)."""
    if not isinstance(model, PeftModel):
        return model
    adapters = set(adapter_positions(model.get_base_model(), layer_map).values())
    for name, _ in model.named_modules():
        if name.endswith("lora_A"):
            parts = name.split(".layers.")
            position = int(parts[1].split(".")[0]) if len(parts) > 1 else -1
            if position not in adapters:
                raise ValueError(f"emulator: LoRA module '{name}' is outside the adapter blocks and would be lost")
    return copy.deepcopy(model).merge_and_unload()


def adapter_positions(model: PreTrainedModel, layer_map: LayerMap) -> dict[int, int]:
    """Original adapter index -> block position in `model` (emulator or full backbone)."""
    n = len(decoder_layers(model))
    if n == layer_map.num_layers:
        return {i: i for i in layer_map.adapter_layers()}
    if n == len(layer_map.emulator_layers()):
        return {i: layer_map.compact().emulator_index()[i] for i in layer_map.adapter_layers()}
    raise ValueError(f"emulator: model has {n} blocks, layer map expects {layer_map.num_layers} or {len(layer_map.emulator_layers())}")


def adapter_state(model: PreTrainedModel, layer_map: LayerMap) -> dict[str, np.ndarray]:
    """The adapter blocks' parameters as fp32 numpy copies keyed by ORIGINAL block index.

    Works on the emulator, the full backbone, or either wrapped with LoRA (merged first).
    """
    plain = _plain(model, layer_map)
    layers = decoder_layers(plain)
    out = {}
    for original, position in adapter_positions(plain, layer_map).items():
        for name, tensor in layers[position].state_dict().items():
            out[f"{LAYER_PREFIX}{original}.{name}"] = tensor.detach().cpu().to(torch.float32).numpy().copy()
    return out


@torch.no_grad()
def load_adapter_state(model: PreTrainedModel, arrays: Mapping[str, np.ndarray], layer_map: LayerMap) -> None:
    """Load `adapter_state` arrays into the adapter blocks of an emulator or full backbone, exactly."""
    if isinstance(model, PeftModel):
        raise ValueError("emulator: load adapter state into the plain model, before attaching LoRA")
    layers = decoder_layers(model)
    targets = {}
    for original, position in adapter_positions(model, layer_map).items():
        for name, tensor in layers[position].state_dict(keep_vars=True).items():
            targets[f"{LAYER_PREFIX}{original}.{name}"] = tensor
    missing, unknown = sorted(set(targets) - set(arrays)), sorted(set(arrays) - set(targets))
    if missing or unknown:
        what = f"missing {missing[0]!r}" if missing else f"unknown {unknown[0]!r}"
        raise ValueError(f"emulator: adapter arrays do not match the adapter blocks ({what})")
    for key, target in targets.items():
        value = np.asarray(arrays[key])
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"emulator: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        target.copy_(torch.from_numpy(np.array(value, copy=True)).to(target.dtype))


def plug_in(full_model: PreTrainedModel, emulator: PreTrainedModel, layer_map: LayerMap) -> PreTrainedModel:
    """A copy of the full backbone with the emulator's (trained, LoRA-merged) adapter blocks."""
    if isinstance(full_model, PeftModel):
        raise ValueError("emulator: plug into the plain backbone, not a PeftModel")
    target = copy.deepcopy(full_model)
    load_adapter_state(target, adapter_state(emulator, layer_map), layer_map)
    return target


def unique_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameter count, bytes) counting tied tensors once."""
    seen, count, nbytes = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            count += p.numel()
            nbytes += p.numel() * p.element_size()
    return count, nbytes
