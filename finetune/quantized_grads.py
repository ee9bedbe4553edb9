"""Do LoRA gradients through a quantized backbone match those through its dequantized fp32 twin?

`compare(spec, mode)` loads the backbone quantized, evaluates it once (the order a simulation
worker uses: an evaluation pass, then training on the same cached model), and returns the
cosine between the LoRA gradients on a fixed batch through the quantized model and through the
fp32 model holding exactly the weights the quantized one computes with. A healthy path gives
~1.0; a kernel that does not backpropagate gives no gradient (cosine 0). Used by the tests (on
every bitsandbytes kernel path this CPU can take) and by benchmarks/privacy_quantization.py.
"""

from __future__ import annotations

import torch

from finetune.backbone import load_backbone
from finetune.batches import collate, encode_example
from finetune.examples import Example
from finetune.lora import LoraSettings, attach_lora
from finetune.loss import answer_loss

EXAMPLES = [Example("Reverse the word.", w, w[::-1]) for w in ["abc", "dog", "tree", "sun", "lamp", "river"]]


def lora_gradients(model: torch.nn.Module, tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gradients of the answer loss on EXAMPLES w.r.t. fresh LoRA (B set to small seeded values,
    so A gets a gradient too) on `model`; the model ends with LoRA attached."""
    peft = attach_lora(model, LoraSettings(rank=4), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft.train()
    batch = collate([encode_example(tokenizer, ex, 64) for ex in EXAMPLES], tokenizer.pad_token_id)
    peft.zero_grad(set_to_none=True)
    answer_loss(peft, batch).backward()
    peft.eval()
    return {name: p.grad for name, p in peft.named_parameters() if p.requires_grad}


def cosine(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor]) -> float:
    """Cosine of the concatenated gradients; 0 when `a` has none at all."""
    if any(g is None for g in a.values()):
        return 0.0
    flat_a = torch.cat([a[k].flatten() for k in b])
    flat_b = torch.cat([b[k].flatten() for k in b])
    return float(torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0))


def compare(mode: str, spec: str = "tiny", device: str = "cpu") -> dict:
    """Evaluate the quantized model first (the order a simulation worker uses), then compare;
    both models on `device` (bitsandbytes' CUDA kernels on a GPU)."""
    from finetune.device import resolve_device
    from finetune.evaluate import evaluate
    from finetune.quantized import dequantized_backbone, inference_packed_layers, load_quantized_backbone

    where = resolve_device(device)
    model, tokenizer = load_quantized_backbone(spec, mode, device=str(where))
    reference = dequantized_backbone(model, load_backbone(spec)[0].to(where))
    evaluate(model, tokenizer, EXAMPLES[:2], 64, 4)  # a no-grad pass in eval mode on the same model
    packed = len(inference_packed_layers(model))
    quantized = lora_gradients(model, tokenizer)
    plain = lora_gradients(reference, tokenizer)
    return {
        "mode": mode,
        "cosine": cosine(quantized, plain),
        "missing": sum(g is None for g in quantized.values()),
        "nonzero_b": sum(1 for k, g in quantized.items() if "lora_B" in k and g is not None and bool(g.any())),
        "packed_after_eval": packed,
    }
