"""Uniform vs energy-aware client selection on a heterogeneous fleet, side by side, many seeds.

The selection policies of the coordinator (coordinator/selection.py) over the population of an
experiment file (default simulations/experiments/energy.toml: 20 clients on solar, coal-heavy,
average and hydro power), costed with coordinator/energy.py, with every client's round taking
the same measured training seconds (`--seconds`, what a tiny-model round takes here): the
policies are compared without training noise. Uniform is Flower's draw (a seeded sample of
`fraction-train`). Prints totals per seed and mean ratios to uniform, with Jain's index.

    python benchmarks/energy_selection.py --seeds 10
    python benchmarks/energy_selection.py --rounds 10 --fairness-rounds 10 --fairness-weight 1.5 --no-batteries --seconds 7 --update-mb 1.84
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.energy import client_energy, compute_seconds  # noqa: E402
from coordinator.selection import Candidate, ClientSelection  # noqa: E402
from simulations.experiment import load_experiment  # noqa: E402


def run(mode: str, objective: str, experiment, seed: int, seconds: float, update_mb: float, batteries: bool = True) -> dict[str, float]:
    config = experiment.config.replace(seed=seed)
    population = experiment.population(config)
    profiles = [population.profile_of(pid) for pid in range(config.clients)]
    candidates = [Candidate(pid, pid, p if batteries else dataclasses.replace(p, battery_wh=0.0)) for pid, p in enumerate(profiles)]
    slots = max(int(config.clients * config.fraction_train), config.min_train_clients)
    selection = ClientSelection(mode, config.selection_fairness_rounds, config.selection_battery_threshold, seed, config.clients, objective, config.selection_fairness_weight)
    rng = np.random.default_rng([seed, 99])
    joules = gco2e = 0.0
    for t in range(1, config.num_server_rounds + 1):
        sampled = [int(n) for n in rng.choice(config.clients, slots, replace=False)]
        for node in selection.choose(t, candidates, sampled, update_mb):
            profile = candidates[node].profile
            energy = client_energy(profile, compute_seconds(profile, seconds, simulated=True), update_mb * 1e6, update_mb * 1e6)
            selection.spend(node, profile, energy.joules, seconds)
            joules, gco2e = joules + energy.joules, gco2e + energy.gco2e
    record = selection.round_record()
    return {"joules": joules, "gco2e": gco2e, "jain": record["jain_index"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(Path(__file__).resolve().parents[1] / "simulations/experiments/energy.toml"))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured training seconds of every client round")
    parser.add_argument("--update-mb", type=float, default=0.03, help="MB sent and received per client round")
    parser.add_argument("--fairness-rounds", type=int, default=0, help="override the experiment's selection-fairness-rounds K (0 = keep)")
    parser.add_argument("--fairness-weight", type=float, default=-1.0, help="override the experiment's selection-fairness-weight g (< 0 = keep)")
    parser.add_argument("--no-batteries", action="store_true", help="every client on mains power (battery-wh 0)")
    parser.add_argument("--rounds", type=int, default=0, help="override the experiment's num-server-rounds (0 = keep)")
    args = parser.parse_args()
    experiment = load_experiment(args.experiment)
    if args.fairness_rounds:
        experiment.config = experiment.config.replace(selection_fairness_rounds=args.fairness_rounds)
    if args.fairness_weight >= 0:
        experiment.config = experiment.config.replace(selection_fairness_weight=args.fairness_weight)
    if args.rounds:
        experiment.config = experiment.config.replace(num_server_rounds=args.rounds)
    rows = {"uniform": ("uniform", "carbon"), "energy-aware (carbon)": ("energy-aware", "carbon"), "energy-aware (energy)": ("energy-aware", "energy")}
    results = {name: [run(mode, obj, experiment, s, args.seconds, args.update_mb, not args.no_batteries) for s in range(args.seeds)] for name, (mode, obj) in rows.items()}
    c = experiment.config
    print(f"{c.clients} clients, {c.num_server_rounds} rounds, fraction-train {c.fraction_train}, fairness K={c.selection_fairness_rounds}, "
          f"weight g={c.selection_fairness_weight:g}, {'no batteries' if args.no_batteries else 'batteries'}, {args.seeds} seeds")
    print(f"{'selection':24} {'joules':>9} {'gCO2e':>8} {'Jain':>6} {'J / uniform':>12} {'gCO2e / uniform':>16}")
    base = results["uniform"]
    for name, runs in results.items():
        joules = statistics.mean(r["joules"] for r in runs)
        gco2e = statistics.mean(r["gco2e"] for r in runs)
        jain = statistics.mean(r["jain"] for r in runs)
        j_ratio = statistics.mean(r["joules"] / b["joules"] for r, b in zip(runs, base))
        g_ratio = statistics.mean(r["gco2e"] / b["gco2e"] for r, b in zip(runs, base))
        print(f"{name:24} {joules:9.1f} {gco2e:8.4f} {jain:6.3f} {j_ratio:12.3f} {g_ratio:16.3f}")


if __name__ == "__main__":
    main()
