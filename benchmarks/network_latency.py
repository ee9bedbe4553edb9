"""A networked round against a simulated one: the same tiny-model run, side by side in one run.

The network run is real: `fedsite coordinator` (gateway + SuperLink on loopback, TLS, node
authentication) and three `fedsite client` processes (SuperNode + warm worker) on this machine.
The simulation runs the same configuration with `fedsite simulate`. Printed per round (rounds
2-5; round 1 also starts the workers) from each run's `metrics.jsonl` `round_seconds` (from
sampling to the aggregate), their ratio, and the target: a steady network round at most 2x the
simulated one plus 5 s. Then each client's per-message overhead, from its log lines: from the
moment the device's executor (client/executor.py, one long-lived loop instead of Flower's
`flwr-clientapp` process per message) claimed the task to the handoff to the warm worker,
which includes waiting for the SuperNode to finish pulling the message's objects; the worker's
round trip; and the executor's pull and push of the message through the SuperNode.

    python benchmarks/network_latency.py                 # 3 clients, 5 rounds, 10 local steps
    python benchmarks/network_latency.py --rounds 3 --keep results/bench-network
    python benchmarks/network_latency.py --poll-intervals 3,0.5     # Flower's idle sleep against Fedsite's default
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulations.local_network import FEDSITE, LocalNetwork, rows  # noqa: E402

FORWARDER = re.compile(r"forwarder (\w+): started ([\d.]+)s before handoff, worker ([\d.]+)s")
EXECUTOR = re.compile(r"executor task: pulled ([\d.]+)s, ClientApp ([\d.]+)s, pushed ([\d.]+)s")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for each run")
    p.add_argument("--poll-intervals", default="0.5", help="the clients' --poll-interval, one network run each, side by side (e.g. 3,0.5: Flower's own 3 s idle sleep against Fedsite's default)")
    p.add_argument("--keep", default="", help="folder to keep the runs and logs in (default: a temporary one)")
    return p.parse_args()


def run_options(args: argparse.Namespace) -> list[str]:
    return ["--model", "tiny", "--clients", str(args.clients), "--min-train-clients", str(args.clients),
            "--num-server-rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--batch-size", "8",
            "--train-per-task", "10", "--test-per-task", "2", "--eval-examples", "6", "--max-new-tokens", "4",
            "--round-timeout", "300"]  # fmt: skip


def simulated(args: argparse.Namespace, root: Path) -> list[dict]:
    out = root / "sim"
    with (root / "simulate.log").open("wb") as log:
        subprocess.run([*FEDSITE, "simulate", *run_options(args), "--workers", "1", "--out", str(out)], cwd=root, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout, check=True)
    return rows(out)


def networked(args: argparse.Namespace, root: Path, poll: float) -> tuple[list[dict], list[tuple[str, float, float]]]:
    names = [f"client-{i + 1}" for i in range(args.clients)]
    net = LocalNetwork(root / f"net-poll-{poll:g}", enrolled={"enrolled": names}, data_clients=args.clients)
    try:
        coordinator = net.coordinator("run", run_options(args))
        if not net.wait_for(lambda: "submitted" in (net.root / "coordinator-run.log").read_text(), 120):
            raise SystemExit(f"the coordinator did not submit the run\n{net.logs()}")
        for i, name in enumerate(names):
            net.client(name, f"data-{i}.jsonl", "--poll-interval", str(poll))
        started = time.monotonic()
        while coordinator.poll() is None and time.monotonic() - started < args.timeout:
            time.sleep(1.0)
        if coordinator.returncode != 0:
            raise SystemExit(f"the network run failed (exit {coordinator.returncode})\n{net.logs()}")
        logs = [(net.root / f"{name}.log").read_text(errors="replace") for name in names]
        overhead = [(m[1], float(m[2]), float(m[3])) for text in logs for m in FORWARDER.finditer(text)]
        overhead += [("executor pull/push", float(m[1]), float(m[3])) for text in logs for m in EXECUTOR.finditer(text)]
        return rows(net.root / "run"), overhead
    finally:
        net.stop_all()


def main() -> None:
    args = parse()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedsite-network-latency-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"runs and logs in {root}", flush=True)
    sim = {r["round"]: r["round_seconds"] for r in simulated(args, root) if r.get("round")}
    polls = [float(p) for p in args.poll_intervals.split(",") if p.strip()]
    nets, overheads = {}, {}
    for poll in polls:
        net_rows, overheads[poll] = networked(args, root, poll)
        nets[poll] = {r["round"]: r["round_seconds"] for r in net_rows if r.get("round")}

    steady = [r for r in sorted(sim) if r >= 2 and all(r in net for net in nets.values())]
    print(f"\n## Round seconds: network (loopback, TLS, {args.clients} clients) vs simulation, tiny model, {args.local_steps} local steps\n")
    print("| round | simulated s | " + " | ".join(f"network s, poll {p:g} s | ratio | target (2x sim + 5 s)" for p in polls) + " |")
    print("|---:|---:|" + "---:|---:|---:|" * len(polls))
    for r in steady:
        cells = [f"{nets[p][r]:.2f} | {nets[p][r] / sim[r]:.1f}x | {2 * sim[r] + 5:.2f} {'met' if nets[p][r] <= 2 * sim[r] + 5 else 'MISSED'}" for p in polls]
        print(f"| {r} | {sim[r]:.2f} | " + " | ".join(cells) + " |")
    if steady:
        s = statistics.median(sim[r] for r in steady)
        cells = []
        for p in polls:
            n = statistics.median(nets[p][r] for r in steady)
            cells.append(f"{n:.2f} | {n / s:.1f}x | {2 * s + 5:.2f} {'met' if n <= 2 * s + 5 else 'MISSED'}")
        print(f"| median | {s:.2f} | " + " | ".join(cells) + " |")
    overhead = overheads[polls[-1]]
    print(f"\n## Per-message overhead on the clients, poll {polls[-1]:g} s\n")
    if not overhead:
        print("no forwarder lines found in the client logs")
        return
    print("query and train: from the executor's claim of the task to the handoff to the worker, and the worker's round trip;")
    print("executor pull/push: its pull of the message from the SuperNode and its push of the reply (round 1 includes first imports)\n")
    print("| message | count | claim to handoff s / pull s (median) | worker round trip s / push s (median) |\n|---|---:|---:|---:|")
    for kind in sorted({k for k, _, _ in overhead}):
        rows = [(a, b) for k, a, b in overhead if k == kind]
        print(f"| {kind} | {len(rows)} | {statistics.median(a for a, _ in rows):.2f} | {statistics.median(b for _, b in rows):.2f} |")


if __name__ == "__main__":
    main()
