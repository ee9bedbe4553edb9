"""QLoRA-style backbones: the frozen backbone in 4-bit NF4 or 8-bit (bitsandbytes), LoRA on top.

`load_quantized_backbone(spec, mode)` loads through transformers' `BitsAndBytesConfig` from a
local folder, then runs `peft.prepare_model_for_kbit_training`; attach LoRA afterwards with
`finetune.lora.attach_lora` as for a plain backbone (LoRA weights stay fp32). A mode this
machine cannot run raises `QuantizationUnsupported`: never a silent fp32 fallback.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from finetune.backbone import BackboneError, build_char_tokenizer, build_tiny_llama, cache_dir, save_folder_atomically, smollm2_folder

log = logging.getLogger(__name__)

MODES = ("nf4", "int8")


class QuantizationUnsupported(RuntimeError):
    """The requested quantization cannot run on this machine (missing library or backend)."""


def _bnb_config(mode: str):
    from transformers import BitsAndBytesConfig

    if mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=False,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def check_mode(mode: str, device: str = "cpu") -> None:
    """Raise ValueError for an unknown mode, QuantizationUnsupported if this machine cannot run it.

    Probes one tiny bitsandbytes layer on `device` (forward and backward), which is what
    fails first when the library or its backend for this device is missing.
    """
    if mode not in MODES:
        raise ValueError(f"quantization: unknown mode {mode!r}; valid modes are {', '.join(MODES)}")
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken native library
        raise QuantizationUnsupported(
            f"quantization '{mode}' cannot run on this machine: bitsandbytes is not usable ({type(err).__name__}: {err}); "
            "pip install bitsandbytes"
        ) from err
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            base = torch.nn.Linear(64, 64, bias=False)
        if mode == "nf4":
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(base.weight.data, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(base.weight.data, requires_grad=False, has_fp16_weights=False)
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        out = layer(x)
        out.float().sum().backward()
        if not torch.isfinite(out).all() or x.grad is None:
            raise RuntimeError("probe layer gave non-finite output or no input gradient")
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QuantizationUnsupported(
            f"quantization '{mode}' cannot run on this machine ({device}, bitsandbytes {bnb.__version__}): {reason}"
        ) from err


def _folder(spec: str) -> Path:
    if spec == "smollm2":
        return smollm2_folder()
    if spec == "tiny":
        target = cache_dir() / "tiny-llama"
        if not (target / "model.safetensors").is_file():
            _save_atomically(target)
        return target
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise BackboneError(f"model: '{folder}' has no config.json; expected 'smollm2', 'tiny' or a Hugging Face model folder")
    return folder


def _save_atomically(target: Path) -> None:
    save_folder_atomically(build_tiny_llama(), build_char_tokenizer(), target)


def is_quantized(model: torch.nn.Module) -> bool:
    """True when at least one Linear runs through bitsandbytes 4- or 8-bit."""
    import bitsandbytes as bnb

    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def load_quantized_backbone(
    spec: str = "smollm2", mode: str = "nf4", device: str = "cpu", gradient_checkpointing: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(frozen quantized model in eval mode, tokenizer with a pad token) for `spec` in `mode`.

    Linear layers of the decoder are quantized; embeddings, norms and the LM head stay fp32
    (transformers' default). `gradient_checkpointing` trades compute for activation memory.
    """
    check_mode(mode, device)
    folder = _folder(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=_bnb_config(mode), dtype=torch.float32, device_map={"": device}
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QuantizationUnsupported(f"quantization '{mode}': cannot load '{folder}' quantized: {reason}") from err
    if not is_quantized(model):
        raise QuantizationUnsupported(f"quantization '{mode}': '{folder}' loaded without any bitsandbytes layer; refusing an fp32 fallback")

    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    log.info("Loaded %s as %s: %.1f MiB", spec, mode, model_memory_bytes(model) / 2**20)
    return model, tokenizer


def _quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """Tensors bitsandbytes keeps beside packed weights (4-bit absmax/code, 8-bit row scales)."""
    out = []
    state = getattr(param, "quant_state", None)
    while state is not None:
        out += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None), getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
        state = getattr(state, "state2", None)
    scb = getattr(param, "SCB", None)
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    return out


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters, buffers and quantization state, each storage once.

    Packed 4-bit weights are uint8 tensors with two values per byte, so their storage counts
    as it is; the per-block scales beside them count too.
    """
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters()) + list(model.buffers())
    for p in list(model.parameters()):
        tensors += _quant_state_tensors(p)
    for t in tensors:
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.numel() else 0
    return total
