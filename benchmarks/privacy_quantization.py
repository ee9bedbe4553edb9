"""What privacy and quantization cost, measured side by side in one run.

1. Client step time: DP-SGD vs plain (its noise from the OS CSPRNG, as clients draw it, and
   from a seeded torch generator, to show what secure noise costs), NF4 and int8 backbones vs
   fp32 (interleaved repeats, median), plus model memory; for NF4 and int8, whether LoRA gets the right gradient after an
   evaluation pass (cosine to the gradient through the dequantized fp32 twin; 0 = no gradient).
2. Upload bytes of one real client update under each codec, as ratios to fp32.
3. Held-out exact match after the same federated run: plain, each upload codec, local DP
   (Opacus, target epsilon), user-level DP (DP-FedAvg), NF4 and int8 backbones (with federated
   evaluation on, so each client evaluates its cached model between training rounds).

    python benchmarks/privacy_quantization.py                # embedded SmolLM2 (long: ~8 runs)
    python benchmarks/privacy_quantization.py --model tiny   # plumbing check in a minute or two
    python benchmarks/privacy_quantization.py --variants plain,nf4,int8   # a subset of the federated runs
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import torch

from finetune.backbone import load_backbone
from finetune.config import FedsiteConfig
from finetune.lora import LoraSettings, attach_lora, get_lora_arrays
from finetune.privacy import DPSettings, train_private
from finetune.quantized import load_quantized_backbone, model_memory_bytes
from finetune.quantized_grads import compare
from finetune.sources import run_splits
from finetune.train import TrainSettings, train
from protos.codecs import CODECS, encoded_nbytes
from protos.updates import encode_update
from simulations.runner import simulate


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=6, help="steps per timing repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="client batch size in the federated runs")
    p.add_argument("--eval-examples", type=int, default=60, help="held-out examples the coordinator scores")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--skip-federated", action="store_true", help="only timings and bytes")
    p.add_argument("--variants", default="", help="comma-separated keys of the federated runs to do (default: all): " + ",".join(VARIANT_KEYS))
    p.add_argument("--out", default="results/bench-privacy-quantization")
    return p.parse_args()


VARIANT_KEYS = ("plain", "fp16", "int8-upload", "4bit", "local-dp", "user-dp", "nf4", "int8")


def step_times(model_spec: str, examples, steps: int, repeats: int) -> tuple[dict[str, float], dict[str, int]]:
    """Median seconds per step of each client variant; DP steps normalised to the mean batch."""
    lora = LoraSettings()
    settings = TrainSettings(steps=steps, batch_size=4, lr=1e-3)
    fp32, tokenizer = load_backbone(model_spec)
    models = {"fp32": fp32}
    for mode in ("nf4", "int8"):
        models[mode] = load_quantized_backbone(model_spec, mode)[0]
    memory = {name: model_memory_bytes(m) for name, m in models.items()}
    models = {name: attach_lora(m, lora) for name, m in models.items()}
    runs = {
        "plain fp32": lambda: train(models["fp32"], tokenizer, examples, settings),
        "DP-SGD fp32": lambda: train_private(models["fp32"], tokenizer, examples, settings, DPSettings(), None)[0],
        "DP-SGD fp32, seeded torch noise": lambda: train_private(models["fp32"], tokenizer, examples, settings, DPSettings(seed=0), None)[0],
        "plain nf4": lambda: train(models["nf4"], tokenizer, examples, settings),
        "plain int8": lambda: train(models["int8"], tokenizer, examples, settings),
    }
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so machine noise hits every variant alike
        for name, run in runs.items():
            result = run()
            times[name].append(result.seconds / result.steps)
    return {name: statistics.median(v) for name, v in times.items()}, memory


def upload_ratios(model_spec: str, examples) -> dict[str, tuple[int, float]]:
    """Encoded bytes of one real client update per codec, and fp32 bytes / codec bytes."""
    model, tokenizer = load_backbone(model_spec)
    model = attach_lora(model, LoraSettings())
    start = get_lora_arrays(model)
    train(model, tokenizer, examples, TrainSettings(steps=4, batch_size=4, lr=2e-3))
    trained = get_lora_arrays(model)
    sizes = {codec: encoded_nbytes(encode_update(trained, start, codec)) for codec in CODECS}
    return {codec: (size, sizes["fp32"] / size) for codec, size in sizes.items()}


def federated(args: argparse.Namespace) -> dict[str, dict]:
    out = Path(args.out)
    base = FedsiteConfig(
        model=args.model, clients=args.clients, num_server_rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch_size, eval_examples=args.eval_examples
    )
    variants = {
        "plain": ("plain (fp32 upload)", {}),
        "fp16": ("fp16 upload", {"upload_codec": "fp16"}),
        "int8-upload": ("int8 upload", {"upload_codec": "int8"}),
        "4bit": ("4bit upload", {"upload_codec": "4bit"}),
        "local-dp": (f"local DP (eps {args.target_epsilon:g})", {"dp": "local", "target_epsilon": args.target_epsilon}),
        "user-dp": ("user-level DP (z=0.5)", {"dp": "client", "noise_multiplier": 0.5, "dp_clip_norm": 0.05}),
        "nf4": ("NF4 backbone (federated eval on)", {"quantize": "nf4", "fraction_evaluate": 1.0}),
        "int8": ("int8 backbone (federated eval on)", {"quantize": "int8", "fraction_evaluate": 1.0}),
    }
    chosen = [k.strip() for k in args.variants.split(",") if k.strip()] or list(VARIANT_KEYS)
    unknown = sorted(set(chosen) - set(variants))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANT_KEYS)}")
    results = {}
    for name, changes in (variants[k] for k in chosen):
        folder = out / name.split(" (")[0].replace(" ", "-")
        simulate(base.replace(out=str(folder), **changes))
        final = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
        ledger_file = folder / "privacy.jsonl"
        ledger = [json.loads(line) for line in ledger_file.read_text().splitlines()] if ledger_file.exists() else []
        results[name] = {
            "accuracy": final["eval_accuracy"],
            "upload_mb": sum(json.loads(l).get("upload_bytes", 0) for l in (folder / "metrics.jsonl").read_text().splitlines()) / 1e6,
            "epsilon": max((e["epsilon"] for e in ledger), default=None),
        }
    return results


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    examples = list(run_splits(FedsiteConfig())[0][:64])

    times, memory = step_times(args.model, examples, args.steps, args.repeats)
    grads = {f"plain {mode}": compare(mode, args.model) for mode in ("nf4", "int8")}
    print(f"\n## Client step time ({args.model}, LoRA r=8 q/v, batch 4; median of {args.repeats} x {args.steps} steps)\n")
    print("LoRA grad: after one evaluation pass, cosine of the LoRA gradient to the one through the dequantized fp32 backbone (0: no gradient).")
    print(f"Secure DP-SGD noise costs {times['DP-SGD fp32'] / times['DP-SGD fp32, seeded torch noise']:.2f}x the seeded-noise step.\n")
    print("| client | s/step | vs plain fp32 | model memory MiB | vs fp32 | LoRA grad |\n|---|---:|---:|---:|---:|---:|")
    memory_of = {"plain fp32": "fp32", "DP-SGD fp32": "fp32", "DP-SGD fp32, seeded torch noise": "fp32", "plain nf4": "nf4", "plain int8": "int8"}
    for name, seconds in times.items():
        mem = memory[memory_of[name]]
        grad = f"{grads[name]['cosine']:.4f}" if name in grads else "–"
        print(f"| {name} | {seconds:.3f} | {seconds / times['plain fp32']:.2f}x | {mem / 2**20:.1f} | {mem / memory['fp32']:.2f}x | {grad} |")

    print("\n## Upload bytes of one client update\n")
    print("| codec | bytes | fp32 / codec |\n|---|---:|---:|")
    for codec, (size, ratio) in upload_ratios(args.model, examples).items():
        print(f"| {codec} | {size:,} | {ratio:.2f}x |")

    if args.skip_federated:
        return
    results = federated(args)
    print(f"\n## Held-out exact match after the same federated run ({args.clients} clients, {args.rounds} rounds, {args.local_steps} local steps, batch {args.batch_size}, {args.eval_examples} held-out examples)\n")
    print("| run | exact match | vs plain | upload MB | epsilon |\n|---|---:|---:|---:|---:|")
    plain = results.get("plain (fp32 upload)", {}).get("accuracy", 0.0)
    for name, r in results.items():
        eps = "–" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        print(f"| {name} | {r['accuracy']:.3f} | {r['accuracy'] - plain:+.3f} | {r['upload_mb']:.2f} | {eps} |")


if __name__ == "__main__":
    main()
