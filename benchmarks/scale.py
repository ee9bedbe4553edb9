"""Simulation at scale: memory and round time at 50, 200 and 500 clients, in one run.

Every population does the same work per round (a fixed number of sampled clients, the same
local steps), so memory and time should not grow with the number of clients. Each size runs
as its own `fedsite simulate` process; the peak RSS summed over its process tree (coordinator,
Ray's processes and workers) is sampled every 0.2 s. Printed as ratios to the first size:

- peak RSS (target: the largest population within 1.2x of the smallest),
- seconds per round (rounds after the first, which also starts the Ray workers), and the
  framework's share of it in seconds (round time - client compute): on a shared machine the
  client compute varies with the load, the framework seconds show what grows with clients,
- framework overhead: (round time - sum of client compute) / round time, where round time
  runs from sampling to the aggregate (the coordinator's central evaluation is not in it) and
  client compute is each client's measured local training time (target: under 15%; with one
  worker, so that client compute is sequential).

    python benchmarks/scale.py --model tiny                  # the numbers in the README
    python benchmarks/scale.py --sizes 50 200 500 --sampled 10 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 500])
    p.add_argument("--sampled", type=int, default=10, help="clients trained per round, whatever the population")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--experiment", default="", help="optional experiment TOML (population, profiles) to scale")
    p.add_argument("--out", default="", help="folder for the runs (default: a temporary one)")
    return p.parse_args()


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_size(args: argparse.Namespace, clients: int, out: Path) -> dict:
    """One simulated federation of `clients` clients; its peak RSS and per-round timings."""
    cmd = [
        sys.executable, "-m", "fedsite", "simulate", "--model", args.model, "--clients", str(clients),
        "--rounds", str(args.rounds), "--fraction-train", str(args.sampled / clients), "--min-train-clients", str(args.sampled),
        "--local-steps", str(args.local_steps), "--batch-size", "4", "--workers", str(args.workers),
        "--train-per-task", str(max(200, clients)), "--test-per-task", "4", "--eval-examples", "8", "--max-new-tokens", "4",
        "--out", str(out),
    ]
    if args.experiment:
        cmd += ["--config", args.experiment]
    measured = out / "benchmark.json"  # a finished size is summarised again, not re-run
    if not measured.is_file():
        measured.parent.mkdir(parents=True, exist_ok=True)
        measured.write_text(json.dumps(measure(cmd, clients)))
    memory = json.loads(measured.read_text())
    rows = [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()) if r["round"] > 0]  # not the baseline
    clients_rows = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    later = [r for r in rows if r["round"] > 1] or rows
    round_times = [r["round_seconds"] for r in later]  # from configure_train to the aggregate, before central evaluation
    compute = [sum(c.get("train_seconds", 0.0) for c in clients_rows if c["round"] == r["round"]) for r in later]
    return {
        "clients": clients,
        **memory,
        "seconds_per_round": statistics.median(round_times),
        "framework_seconds_per_round": statistics.median(t - c for t, c in zip(round_times, compute)),
        "overhead": statistics.median((t - c) / t for t, c in zip(round_times, compute)),
        "trained_per_round": statistics.mean(len(r.get("contributors", [])) for r in later),
    }


def measure(cmd: list[str], clients: int) -> dict:
    """Run `cmd`, sampling its process tree's RSS; peak MB and wall seconds."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    handle, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(handle))
        time.sleep(0.2)
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        sys.exit(f"scale: the {clients}-client run failed (exit {proc.returncode}): {stderr.strip().splitlines()[-1:]}")
    return {"peak_rss_mb": peak / 2**20, "wall_seconds": time.perf_counter() - started}


def main() -> None:
    args = parse()
    root = Path(args.out or tempfile.mkdtemp(prefix="fedsite-scale-"))
    results = []
    for clients in args.sizes:
        print(f"running {clients} clients ({args.sampled} per round, {args.rounds} rounds) ...", flush=True)
        results.append(run_size(args, clients, root / f"clients-{clients}"))
    base = results[0]
    print(f"\nmodel {args.model}, {args.sampled} clients x {args.local_steps} local steps per round, {args.workers} worker(s); runs in {root}\n")
    print("| clients | peak RSS MB | RSS ratio | s/round | s/round ratio | framework s/round | overhead | trained/round |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['clients']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x | {r['seconds_per_round']:.2f} "
              f"| {r['seconds_per_round'] / base['seconds_per_round']:.2f}x | {r['framework_seconds_per_round']:.2f} "
              f"| {100 * r['overhead']:.1f}% | {r['trained_per_round']:.1f} |")
    worst = max(r["peak_rss_mb"] / base["peak_rss_mb"] for r in results)
    print(f"\npeak RSS at most {worst:.2f}x the {base['clients']}-client run (target 1.2x); "
          f"overhead at most {100 * max(r['overhead'] for r in results):.1f}% (target 15%)")
    (root / "scale.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
