"""QLoRA-style backbones: the frozen backbone in 4-bit NF4 or 8-bit (bitsandbytes), LoRA on top.

`load_quantized_backbone(spec, mode)` loads through transformers' `BitsAndBytesConfig` from a
local folder, then runs `peft.prepare_model_for_kbit_training`; attach LoRA afterwards with
`finetune.lora.attach_lora` as for a plain backbone (LoRA weights stay fp32). A mode this
machine cannot run raises `QuantizationUnsupported`: never a silent fp32 fallback.

Gradients must flow through the frozen 4-bit layers to every LoRA module below them. On CPUs
with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit`'s weight, on its first forward in
eval mode without grad (an evaluation), into an inference-only layout; from then on
`matmul_4bit` calls the fused `gemv_4bit` kernel, which has no autograd formula, so every later
backward stops at the first frozen layer and LoRA gets no gradient at all, silently. The
loader turns that repacking off (`keep_trainable_layout`): training and evaluation then both
run `MatMul4Bit` (dequantize + matmul, fp32), on every CPU and on CUDA. `dequantized_backbone`
is the exact fp32 twin of a quantized backbone, the reference its gradients are checked against.
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


def _bnb_config(mode: str, compute_dtype: torch.dtype = torch.float32):
    from transformers import BitsAndBytesConfig

    if mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
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
    spec: str = "smollm2", mode: str = "nf4", device: str = "cpu", gradient_checkpointing: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(frozen quantized model in eval mode, tokenizer with a pad token) for `spec` in `mode`,
    loaded by bitsandbytes straight onto `device` (`device_map`).

    Linear layers of the decoder are quantized; embeddings, norms and the LM head stay fp32
    (transformers' default, and `prepare_model_for_kbit_training` upcasts them anyway); NF4
    layers compute in `compute_dtype` (bf16 on a CUDA GPU with dtype auto). `gradient_checkpointing`
    trades compute for activation memory.
    """
    device = str(device)
    check_mode(mode, device)
    folder = _folder(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=_bnb_config(mode, compute_dtype), dtype=torch.float32, device_map={"": device}
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QuantizationUnsupported(f"quantization '{mode}': cannot load '{folder}' quantized: {reason}") from err
    if not is_quantized(model):
        raise QuantizationUnsupported(f"quantization '{mode}': '{folder}' loaded without any bitsandbytes layer; refusing an fp32 fallback")

    keep_trainable_layout(model)
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    log.info("Loaded %s as %s: %.1f MiB", spec, mode, model_memory_bytes(model) / 2**20)
    return model, tokenizer


def keep_trainable_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its inference-only CPU layout.

    Returns how many layers were switched. Must run before the model's first forward: a layer
    already repacked is an error (its kernel cannot backpropagate and the repacking is not
    undone by a public call).
    """
    import bitsandbytes as bnb

    switched = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise QuantizationUnsupported(f"quantization: layer {name} was repacked for inference before training was set up; load the backbone afresh")
        module.support_avx512bf16_for_cpu = False
        switched += 1
    return switched


def inference_packed_layers(model: torch.nn.Module) -> list[str]:
    """Names of 4-bit layers in bitsandbytes' inference-only CPU layout (through which no gradient flows)."""
    import bitsandbytes as bnb

    return [
        name for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The fp32 weight a bitsandbytes 4-bit or 8-bit layer computes with."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):  # row scales move to the layer's state on its first forward
        scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return module.weight.data.float() * scales.float().unsqueeze(1) / 127.0
    raise TypeError(f"dequantized_weight: {type(module).__name__} is not a bitsandbytes layer")


def dequantized_backbone(model: torch.nn.Module, plain: torch.nn.Module) -> torch.nn.Module:
    """Copy into `plain` (the same architecture in fp32) the weights `model` computes with.

    Every bitsandbytes layer of `model` gives its dequantized weight to the Linear at the same
    path of `plain`; the other parameters (embeddings, norms, head) are copied as they are.
    """
    import bitsandbytes as bnb

    targets = dict(plain.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                targets[name].weight.copy_(dequantized_weight(module).reshape(targets[name].weight.shape))
        quantized = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
        params = dict(plain.named_parameters())
        for name, p in model.named_parameters():
            if name not in quantized and name in params:
                params[name].copy_(p.detach().float())
    return plain


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
