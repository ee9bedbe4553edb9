"""Base model vs federated LoRA vs centralized LoRA, measured side by side in one run.

Federated: `--clients` simulated clients, Dirichlet(`--alpha`) non-IID over task families,
`--per-round` clients per round for `--rounds` rounds of `--local-steps` steps each.
Centralized: one LoRA trained on the pooled training data for the same total number of
optimizer steps (rounds x clients per round x local steps), same batch size and learning rate.
All three are scored by exact match on the same held-out examples.

    python benchmarks/federated_vs_central.py                 # embedded SmolLM2, ~25 min on 2 idle cores
    python benchmarks/federated_vs_central.py --model tiny    # plumbing check in seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from finetune.cache import initial_lora_arrays, lora_model
from finetune.config import FedsiteConfig
from finetune.evaluate import evaluate
from finetune.lora import set_lora_arrays
from finetune.sources import central_eval_set, run_splits
from finetune.train import TrainSettings, train
from simulations.runner import simulate


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--per-round", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--eval-examples", type=int, default=60)
    p.add_argument("--out", default="results/bench-federated-vs-central")
    return p.parse_args()


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    config = FedsiteConfig(
        model=args.model,
        clients=args.clients,
        num_server_rounds=args.rounds,
        fraction_train=args.per_round / args.clients,
        min_train_clients=args.per_round,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        partitioning="dirichlet",
        dirichlet_alpha=args.alpha,
        eval_examples=args.eval_examples,
        out=str(out / "federated"),
    ).validate()
    total_steps = args.rounds * args.per_round * args.local_steps
    eval_set = central_eval_set(config)
    model, tokenizer = lora_model(config.model, config.lora_settings(), config.seed)
    initial = initial_lora_arrays(config.model, config.lora_settings(), config.seed)
    set_lora_arrays(model, initial)

    rows = []
    started = time.perf_counter()
    base = evaluate(model, tokenizer, eval_set, config.max_seq_len, config.max_new_tokens)
    rows.append(("base model", base, 0, time.perf_counter() - started))

    started = time.perf_counter()
    simulate(config)
    final = json.loads((out / "federated" / "metrics.jsonl").read_text().splitlines()[-1])
    fed_seconds = time.perf_counter() - started
    fed_steps = sum(json.loads(line).get("steps", 0) for line in (out / "federated" / "clients.jsonl").read_text().splitlines())

    started = time.perf_counter()
    set_lora_arrays(model, initial)
    pooled = list(run_splits(config)[0])
    settings = TrainSettings(steps=total_steps, batch_size=args.batch_size, lr=args.lr, max_seq_len=config.max_seq_len, seed=config.seed)
    train(model, tokenizer, pooled, settings)
    central = evaluate(model, tokenizer, eval_set, config.max_seq_len, config.max_new_tokens)
    central_seconds = time.perf_counter() - started

    print()
    print(f"model {args.model}; {args.clients} clients, Dirichlet alpha={args.alpha}; {len(eval_set)} held-out examples")
    print("| method | exact match | eval loss | optimizer steps | seconds |")
    print("|---|---:|---:|---:|---:|")
    print(f"| base model | {base.accuracy:.3f} | {base.loss:.3f} | 0 | {rows[0][3]:.0f} |")
    print(f"| federated LoRA ({args.rounds} rounds x {args.per_round} clients x {args.local_steps} steps) | {final['eval_accuracy']:.3f} | {final['eval_loss']:.3f} | {fed_steps} | {fed_seconds:.0f} |")
    print(f"| centralized LoRA (pooled data) | {central.accuracy:.3f} | {central.loss:.3f} | {total_steps} | {central_seconds:.0f} |")
    ratio = final["eval_accuracy"] / central.accuracy if central.accuracy else float("nan")
    print(f"\nfederated / centralized exact match: {ratio:.2f}   federated - base: {final['eval_accuracy'] - base.accuracy:+.3f}")
    print("per task (base / federated / centralized):")
    for task in central.per_task:
        print(f"  {task:12s} {base.per_task.get(task, 0):.2f} / {final['eval_per_task'].get(task, 0):.2f} / {central.per_task[task]:.2f}")


if __name__ == "__main__":
    main()
