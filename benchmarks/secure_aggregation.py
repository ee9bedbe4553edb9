"""What secure aggregation (Flower's SecAgg+) costs against plain FedAvg, side by side.

For each client count the same federation (same seed, data, local training) runs twice through
Flower's simulation: plain (fp32 deltas on the Message API) and secure (SecAgg+ masks, all four
protocol stages). Printed per client count:

- round seconds ratio (secure / plain; mean over rounds 2.. so Ray's start-up in round 1 is out),
- bytes ratio: everything the coordinator received in the protocol, and the masked vectors alone,
  over the plain encoded uploads,
- seconds of each SecAgg+ stage; setup + share keys + unmask is the protocol's own overhead
  (the masked-vector stage holds the local training, as the plain round does), the robust
  number on a busy machine where whole-round times are noisy,
- final held-out accuracy and loss of both, and the largest difference between the two final
  adapters (with `--rounds 1` that is the unmasking error alone; over more rounds AdamW on the
  clients can magnify it on coordinates whose gradients are near zero).

    python benchmarks/secure_aggregation.py                         # tiny Llama, 10, 50 and 100 clients
    python benchmarks/secure_aggregation.py --clients 4,8 --dropout 0.25   # secure runs also lose clients
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from client.secure import secure_client_app, dropout_mod
from finetune.config import FedsiteConfig
from simulations.runner import simulate


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--clients", default="10,50,100", help="comma-separated client counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0, help="share of clients that drop out of every secure round (after sharing keys)")
    p.add_argument("--num-shares", type=float, default=1.0, help="SecAgg+ neighbours per client: a share of the clients (<= 1, 1 = all pairs, as in SecAgg) or a count (the k of SecAgg+)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="results/bench-secure-aggregation")
    return p.parse_args()


def rows(out: Path) -> list[dict]:
    return [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()) if r["round"] > 0]  # not the baseline


def run_pair(args: argparse.Namespace, clients: int) -> dict:
    base = FedsiteConfig(
        model=args.model, clients=clients, min_train_clients=clients, num_server_rounds=args.rounds, local_steps=args.local_steps,
        batch_size=4, train_per_task=4 * clients, test_per_task=4, eval_examples=24, max_new_tokens=4, workers=args.workers,
        secure_max_weight=float(4 * clients),  # >= any client's examples here, so both runs weight clients alike
        secure_num_shares=args.num_shares if args.num_shares <= 1 else float(min(args.num_shares, clients - 1)),
    )
    plain_out = simulate(base.replace(out=f"{args.out}/plain-{clients}"))
    dropped = range(int(round(args.dropout * clients)))
    secure_out = simulate(base.replace(secure=True, out=f"{args.out}/secure-{clients}"), client=secure_client_app(dropout_mod(dropped)))
    plain, secure = rows(plain_out), rows(secure_out)
    later = slice(1, None) if len(plain) > 1 else slice(None)
    a = load_file(str(plain_out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(secure_out / "adapter" / "adapter_model.safetensors"))
    return {
        "clients": clients,
        "dropped": len(dropped),
        "round_seconds_plain": statistics.mean(r["round_seconds"] for r in plain[later]),
        "round_seconds_secure": statistics.mean(r["round_seconds"] for r in secure[later]),
        "bytes_plain": statistics.mean(r["upload_bytes"] for r in plain),
        "bytes_secure": statistics.mean(r["upload_bytes"] for r in secure),
        "bytes_masked": statistics.mean(r["secure_masked_bytes"] for r in secure),
        "accuracy_plain": plain[-1]["eval_accuracy"],
        "accuracy_secure": secure[-1]["eval_accuracy"],
        "loss_plain": plain[-1]["eval_loss"],
        "loss_secure": secure[-1]["eval_loss"],
        "max_abs_diff": max(float(np.max(np.abs(a[k] - b[k]))) for k in a),
        "mean_abs_value": float(np.mean([np.mean(np.abs(v)) for v in a.values()])),
        "stage_seconds": {k: statistics.mean(r["secure_stage_seconds"][k] for r in secure[later]) for k in secure[-1]["secure_stage_seconds"]},
    }


def main() -> None:
    args = parse()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    results = [run_pair(args, int(n)) for n in args.clients.split(",")]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nsecure (SecAgg+) vs plain, model {args.model}, {args.rounds} rounds, {args.local_steps} local steps, dropout {args.dropout:.0%} in secure runs, num-shares {args.num_shares:g}")
    print("| clients | round s plain | round s secure | time ratio | bytes ratio (all stages) | bytes ratio (masked only) | acc plain | acc secure | loss plain | loss secure | max |Δ| adapter |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['clients']} | {r['round_seconds_plain']:.2f} | {r['round_seconds_secure']:.2f} | {r['round_seconds_secure'] / r['round_seconds_plain']:.2f} "
            f"| {r['bytes_secure'] / r['bytes_plain']:.2f} | {r['bytes_masked'] / r['bytes_plain']:.2f} | {r['accuracy_plain']:.3f} | {r['accuracy_secure']:.3f} "
            f"| {r['loss_plain']:.4f} | {r['loss_secure']:.4f} | {r['max_abs_diff']:.2e} (mean |w| {r['mean_abs_value']:.1e}) |"
        )
    print("\nsecure stage seconds (mean over rounds 2..; the masked-vector stage includes local training):")
    for r in results:
        overhead = sum(v for k, v in r["stage_seconds"].items() if k != "collect_masked_vectors")
        print(f"  {r['clients']} clients: " + ", ".join(f"{k} {v:.2f}" for k, v in r["stage_seconds"].items()) + f"; protocol overhead {overhead:.2f} s/round")


if __name__ == "__main__":
    main()
