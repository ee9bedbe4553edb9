"""Offsite tuning vs full-model LoRA, measured side by side in one run (Offsite-Tuning's table).

Rows: full model zero-shot, emulator zero-shot, emulator fine-tuned (federated), plug-in
fine-tuned (federated), full-model LoRA fine-tuned (federated, same clients and steps).
Costs: emulator bytes / backbone bytes, client step time (interleaved repeats, median) and
peak memory (one fresh process per kind) of an emulator client vs a full-model LoRA client.

    python benchmarks/offsite.py                    # embedded SmolLM2 (two federated runs, long)
    python benchmarks/offsite.py --model tiny       # plumbing check in about a minute
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from client.offsite import OffsiteSpec, offsite_model
from emulator.keys import load_public_key, public_key_pem
from finetune.cache import lora_model
from finetune.config import DEFAULT_DISTILL_OBJECTIVE, DISTILL_OBJECTIVES, FedsiteConfig
from finetune.sources import run_splits
from finetune.train import TrainSettings, train
from simulations.runner import simulate


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--adapter-layers", type=int, default=2)
    p.add_argument("--stride", type=int, default=3, help="keep every n-th middle block")
    p.add_argument("--quantize", default="int8", help="storage of the emulator's middle: none, int8 or nf4")
    p.add_argument("--distill-steps", type=int, default=100)
    p.add_argument("--distill-objective", default=DEFAULT_DISTILL_OBJECTIVE, choices=DISTILL_OBJECTIVES)
    p.add_argument("--distill-data", default="", help="examples to distil on (default: built-in families, own seed)")
    p.add_argument("--train", default="blocks", help="offsite clients train the adapter 'blocks' themselves (the paper's) or 'lora' on them")
    p.add_argument("--offsite-lr", type=float, default=0.0, help="learning rate of the offsite clients (0 = 1e-4 for blocks, the run's lr for lora)")
    p.add_argument("--eval-examples", type=int, default=60)
    p.add_argument("--steps", type=int, default=4, help="steps per timing repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/bench-offsite")
    p.add_argument("--reuse-full", default=None, metavar="DIR", help="take the full-model LoRA row from this earlier run (same clients, rounds, steps)")
    p.add_argument("--measure", choices=["full", "emulator"], help=argparse.SUPPRESS)  # child process: peak memory
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, share: float, name: str) -> FedsiteConfig:
    return FedsiteConfig(
        model=args.model,
        clients=args.clients,
        num_server_rounds=args.rounds,
        local_steps=args.local_steps,
        eval_examples=args.eval_examples,
        emulator_share=share,
        emulator_adapter_layers=args.adapter_layers,
        emulator_stride=args.stride,
        emulator_quantize=args.quantize,
        emulator_distill_steps=args.distill_steps,
        emulator_distill_data=args.distill_data,
        emulator_distill_objective=args.distill_objective,
        offsite_train=args.train,
        offsite_lr=args.offsite_lr,
        out=str(Path(args.out) / name),
    ).validate()


def client_models(config: FedsiteConfig, package: Path, key_file: Path, kinds: tuple[str, ...] = ("full", "emulator")) -> dict:
    """(model, tokenizer) of a full-model LoRA client and/or an offsite client, as clients load them."""
    models = {}
    if "full" in kinds:
        models["full"] = lora_model(config.model, config.lora_settings(), config.seed)
    if "emulator" in kinds:
        spec = OffsiteSpec(str(package), public_key_pem(load_public_key(key_file)).decode(), config.offsite_train)
        emulator, tokenizer, _ = offsite_model(spec, config.offsite_lora_settings(), config.seed)
        models["emulator"] = (emulator, tokenizer)
    return models


def step_seconds(models: dict, examples, args: argparse.Namespace, batch_size: int, max_len: int) -> dict[str, float]:
    """Median seconds per training step of each kind, repeats interleaved so load noise hits both."""
    settings = TrainSettings(steps=args.steps, batch_size=batch_size, max_seq_len=max_len, lr=1e-4)
    for model, tokenizer in models.values():  # warm-up
        train(model, tokenizer, examples, TrainSettings(steps=1, batch_size=batch_size, max_seq_len=max_len))
    times: dict[str, list[float]] = {kind: [] for kind in models}
    for _ in range(args.repeats):
        for kind, (model, tokenizer) in models.items():
            times[kind].append(train(model, tokenizer, examples, settings).seconds / args.steps)
    return {kind: statistics.median(values) for kind, values in times.items()}


def peak_memory_mb(kind: str, args: argparse.Namespace, package: Path, key_file: Path) -> float:
    """Peak RSS of a fresh process that loads one kind of client and trains a few steps."""
    command = [sys.executable, __file__, "--measure", kind, "--model", args.model, "--train", args.train, "--steps", "2", "--out", args.out,
               "--adapter-layers", str(args.adapter_layers), "--stride", str(args.stride), "--quantize", args.quantize]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def measure_child(args: argparse.Namespace) -> None:
    config = run_config(args, 1.0, "offsite")
    out = Path(config.out)
    examples = run_splits(config)[0]
    model, tokenizer = client_models(config, out / "emulator", out / "keys" / "public_key.pem", (args.measure,))[args.measure]
    train(model, tokenizer, examples, TrainSettings(steps=args.steps, batch_size=config.batch_size, max_seq_len=config.max_seq_len))
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM): ru_maxrss would carry the parent's peak across fork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def final_row(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def main() -> None:
    args = parse()
    if args.measure:
        measure_child(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    offsite = simulate(run_config(args, 1.0, "offsite"))  # every client gets the emulator
    # every client holds the backbone (the emulator settings do not touch this run)
    full = Path(args.reuse_full) if args.reuse_full else simulate(run_config(args, 0.0, "full-lora"))
    fed_seconds = time.perf_counter() - started
    summary_off, summary_full = final_row(offsite), final_row(full)
    initial, final, off = summary_off["initial"], summary_off["final"], summary_off["offsite"]

    config = run_config(args, 1.0, "offsite")
    package, key_file = offsite / "emulator", offsite / "keys" / "public_key.pem"
    models = client_models(config, package, key_file)
    examples = run_splits(config)[0]
    seconds = step_seconds(models, examples, args, config.batch_size, config.max_seq_len)
    memory = {kind: peak_memory_mb(kind, args, package, key_file) for kind in ("full", "emulator")}

    print()
    print(f"model {args.model}; {args.clients} clients x {args.rounds} rounds x {args.local_steps} steps; emulator k={args.adapter_layers}, stride {args.stride}, middle {args.quantize}, distill {args.distill_steps} steps ({args.distill_objective}), clients train {args.train}" + (f" at lr {args.offsite_lr:g}" if args.offsite_lr else ""))
    print("| setting | exact match | eval loss |")
    print("|---|---:|---:|")
    print(f"| full model zero-shot | {summary_full['initial']['eval_accuracy']:.3f} | {summary_full['initial']['eval_loss']:.3f} |")
    print(f"| emulator zero-shot | {initial['emulator_eval_accuracy']:.3f} | {initial['emulator_eval_loss']:.3f} |")
    print(f"| emulator fine-tuned (federated) | {final['emulator_eval_accuracy']:.3f} | {final['emulator_eval_loss']:.3f} |")
    print(f"| plug-in fine-tuned (federated) | {final['offsite_eval_accuracy']:.3f} | {final['offsite_eval_loss']:.3f} |")
    print(f"| full-model LoRA (federated) | {summary_full['final']['eval_accuracy']:.3f} | {summary_full['final']['eval_loss']:.3f} |")
    print()
    print(f"emulator bytes / backbone bytes: {off['emulator_bytes'] / off['backbone_bytes']:.3f} ({off['emulator_bytes'] / 1e6:.1f} MB / {off['backbone_bytes'] / 1e6:.1f} MB)")
    print(f"client step: full {seconds['full']:.2f} s, emulator {seconds['emulator']:.2f} s -> emulator {seconds['full'] / seconds['emulator']:.2f}x faster")
    print(f"client peak RSS: full {memory['full']:.0f} MB, emulator {memory['emulator']:.0f} MB -> ratio {memory['emulator'] / memory['full']:.2f}")
    print(f"(federated runs took {fed_seconds:.0f} s)")


if __name__ == "__main__":
    main()
