"""Resource-aware federated PEFT on SmolLM2, side by side: Kill-and-Revive, adaptive precision, energy-aware selection.

1. Client step time against where the active LoRA modules sit (same batches, interleaved
   repeats, median): every module, a share in the top blocks, spread over the depth, in the
   bottom blocks. Backward runs only from the loss down to the lowest active module, so the
   saving follows that module's depth, not the share of modules; the "FLOPs" column is the
   counted training FLOPs per token of that placement (finetune/flops.py) against all modules.
2. The same federated run per row (clients, non-IID Dirichlet split, rounds, client steps,
   sampling all alike): exact match and loss on the held-out set, client training seconds and
   counted training GFLOPs (finetune/flops.py), upload bytes, energy and gCO2e, each with its
   ratio to plain FedAvg-LoRA. Compute energy comes from the counted GFLOPs at
   `--simulated-gflops` (the run option `simulated-gflops`), not from this machine's seconds,
   so rows run at different machine loads stay comparable. Rows:
   plain FedAvg-LoRA; kill-revive with 25% and 50% of the modules active, one selection per round
   (`kr-25`, `kr-50`) or one per client (`kr-25-client`, `kr-35-client`, `kr-50-client`; `kr-25-client-top` keeps blocks 0-14 killed;
   `kr-35-client-prior` ranks a client's unscored modules by the federation's scores; `kr-35-client-grad`,
   `kr-25-client-grad` and, one shared selection, `kr-35-grad` score every module by the clients'
   first-step gradient norms, `kr-35-client-grad-top` too with blocks 0-9 killed); adaptive precision
   (`--upload-codec adaptive`); energy-aware client selection (`--client-selection
   energy-aware`). A row whose option this FedsiteConfig does not know is skipped, saying so.
   Energy and carbon come from the metrics rows' `energy_joules` and `gco2e` (per round,
   summed); where a run has none they print n/a.

Resumable per row: each row writes OUT/<row>/result.json and is skipped when that exists (a
row cut short resumes from its own checkpoint).

    nice python benchmarks/resource_aware.py                                  # full table (long)
    nice python benchmarks/resource_aware.py --rows plain,kr-25,kr-50 --rounds 3 --fraction-train 0.2 --local-steps 3
    python benchmarks/resource_aware.py --model tiny --rounds 2 --skip-timing  # plumbing check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tomllib
from pathlib import Path

import tomli_w
import torch

from client.selection import apply_selection
from coordinator.module_selection import depth_of, layer_of
from finetune.cache import lora_model
from finetune.config import ConfigError, FedsiteConfig
from finetune.flops import token_flops
from finetune.lora import get_lora_arrays, set_lora_arrays, set_trainable_factors
from finetune.sources import run_splits
from finetune.train import TrainSettings, train
from protos.selection import encode_selection, modules_of
from simulations.runner import simulate

ROWS = {
    "plain": ("plain FedAvg-LoRA", {}),
    "kr-25": ("kill-revive 25% active", {"module_selection": "kill-revive", "kr_active_share": 0.25}),
    "kr-50": ("kill-revive 50% active", {"module_selection": "kill-revive", "kr_active_share": 0.5}),
    "kr-25-client": ("kill-revive 25% active, per client", {"module_selection": "kill-revive", "kr_active_share": 0.25, "kr_assign": "per-client"}),
    "kr-35-client": ("kill-revive 35% active, per client", {"module_selection": "kill-revive", "kr_active_share": 0.35, "kr_assign": "per-client"}),
    "kr-25-client-top": ("kill-revive 25% active, per client, blocks 15-29", {"module_selection": "kill-revive", "kr_active_share": 0.25, "kr_assign": "per-client", "kr_lowest_block": 15}),
    "kr-35-client-prior": ("kill-revive 35% active, per client, federation prior", {"module_selection": "kill-revive", "kr_active_share": 0.35, "kr_assign": "per-client", "kr_prior": "federation"}),
    "kr-35-client-grad": ("kill-revive 35% active, per client, gradient score, federation prior",
                          {"module_selection": "kill-revive", "kr_active_share": 0.35, "kr_assign": "per-client", "kr_prior": "federation", "kr_score": "gradient"}),
    "kr-35-client-grad-top": ("kill-revive 35% active, per client, gradient score, federation prior, blocks 10-29",
                              {"module_selection": "kill-revive", "kr_active_share": 0.35, "kr_assign": "per-client", "kr_prior": "federation", "kr_score": "gradient", "kr_lowest_block": 10}),
    "kr-25-client-grad": ("kill-revive 25% active, per client, gradient score, federation prior",
                          {"module_selection": "kill-revive", "kr_active_share": 0.25, "kr_assign": "per-client", "kr_prior": "federation", "kr_score": "gradient"}),
    "kr-35-grad": ("kill-revive 35% active, gradient score", {"module_selection": "kill-revive", "kr_active_share": 0.35, "kr_score": "gradient"}),
    "kr-50-client": ("kill-revive 50% active, per client", {"module_selection": "kill-revive", "kr_active_share": 0.5, "kr_assign": "per-client"}),
    "adaptive": ("adaptive precision", {"upload_codec": "adaptive"}),
    "energy-aware": ("energy-aware selection", {"client_selection": "energy-aware", "selection_objective": "energy"}),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows to run: {', '.join(ROWS)}")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--dirichlet-alpha", type=float, default=0.5)
    p.add_argument("--fraction-train", type=float, default=0.25, help="share of clients sampled per round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-examples", type=int, default=40, help="held-out examples the coordinator scores")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--kr-revive-every", type=int, default=3)
    p.add_argument("--workers", type=int, default=1, help="simulation workers (each holds a backbone)")
    p.add_argument("--timing-steps", type=int, default=3, help="steps per timing repeat")
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--skip-timing", action="store_true", help="only the federated rows")
    p.add_argument("--experiment", default="simulations/experiments/energy.toml", help="the fleet every row runs on ([population] and [[profiles]]: power figures, batteries, speeds); '' = identical default clients")
    p.add_argument("--fairness-rounds", type=int, default=8, help="energy-aware row: every client trains at least once every this many rounds")
    p.add_argument("--fairness-weight", type=float, default=1.5, help="energy-aware row: expected cost x (1 + times selected)^g (0 = pure greedy)")
    p.add_argument("--battery-wh", type=float, default=15.0, help="battery capacity of the fleet's battery devices (a phone's ~15 Wh; 0 = the experiment's own, sized to drain in tiny-model rounds)")
    p.add_argument("--simulated-gflops", type=float, default=100.0, help="GFLOP/s of a speed-1 device: compute energy from counted FLOPs (0 = this machine's measured seconds)")
    p.add_argument("--seed", type=int, default=0, help="run seed of every federated row (data split, sampling, LoRA init, Kill-and-Revive order); another seed gives the rows' noise")
    p.add_argument("--seeds", default="", help="comma-separated seeds (overrides --seed; federated rows only, no step-time table): every row per seed, seed 0 in --out and seed N in OUT-seedN, "
                                                "then each row's mean over the seeds with its differences to plain paired by seed")
    p.add_argument("--out", default="results/bench-resource-aware")
    return p.parse_args()


# ---------------------------------------------------------------- 1. step time vs placement


def placements(modules: list[str], share: float) -> dict[str, list[str]]:
    """Module sets of `share` of the modules: top blocks, spread evenly, bottom blocks (and all)."""
    by_depth = sorted(modules, key=lambda m: (layer_of(m) or 0, m))
    count = max(1, round(share * len(modules)))
    stride = len(modules) / count
    return {
        "all modules": list(modules),
        f"{share:.0%} top blocks": by_depth[-count:],
        f"{share:.0%} spread": [by_depth[int(i * stride)] for i in range(count)],
        f"{share:.0%} bottom blocks": by_depth[:count],
    }


def step_times(args: argparse.Namespace) -> list[tuple[str, float, int, float]]:
    """(placement, median s/step, lowest active block, counted FLOPs ratio to all modules) on the same batches."""
    config = FedsiteConfig(model=args.model, lora_targets=args.lora_targets, device="cpu")
    model, tokenizer = lora_model(config.model, config.lora_settings(), config.seed, device="cpu")
    modules = modules_of(get_lora_arrays(model))
    depth = depth_of(modules)
    examples = list(run_splits(config)[0][: 64])
    settings = TrainSettings(steps=args.timing_steps, batch_size=args.batch_size, lr=1e-3)
    start = get_lora_arrays(model)
    variants = {**placements(modules, 0.25), **{k: v for k, v in placements(modules, 0.5).items() if k != "all modules"}}

    flops: dict[str, float] = {}

    def run(active: list[str], name: str = "") -> float:
        set_lora_arrays(model, start)  # every repeat from the same adapter
        apply_selection(model, encode_selection(active))
        try:
            flops[name] = token_flops(model).total
            result = train(model, tokenizer, examples, settings)
        finally:
            set_trainable_factors(model, "AB")
        return result.seconds / result.steps

    print(f"[resource-aware] timing {len(variants)} placements x {args.timing_repeats} repeats x {args.timing_steps} steps ({len(modules)} LoRA modules, {depth} blocks)", flush=True)
    run(variants["all modules"])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.timing_repeats):  # interleaved: machine noise hits every variant alike
        for name, active in variants.items():
            times[name].append(run(active, name))
    rows = []
    for name, active in variants.items():
        lowest = min(layer_of(m) or 0 for m in active)
        rows.append((name, statistics.median(times[name]), lowest, flops[name] / flops["all modules"]))
    return rows


# ---------------------------------------------------------------- 2. federated rows


def row_config(args: argparse.Namespace, changes: dict, folder: Path) -> FedsiteConfig | str:
    """The row's config, or why this FedsiteConfig cannot run it (an option it does not know yet)."""
    base = FedsiteConfig(
        model=args.model, clients=args.clients, partitioning="dirichlet", dirichlet_alpha=args.dirichlet_alpha, fraction_train=args.fraction_train,
        min_train_clients=max(1, round(args.fraction_train * args.clients)), num_server_rounds=args.rounds, local_steps=args.local_steps,
        batch_size=args.batch_size, eval_examples=args.eval_examples, max_new_tokens=args.max_new_tokens, lora_targets=args.lora_targets,
        kr_revive_every=args.kr_revive_every, workers=args.workers, out=str(folder / "run"), experiment=fleet(args, folder),
        selection_fairness_rounds=args.fairness_rounds, selection_fairness_weight=args.fairness_weight, simulated_gflops=args.simulated_gflops,
        seed=args.seed,
    )
    known = {f.name for f in dataclasses.fields(FedsiteConfig)}
    missing = sorted(set(changes) - known)
    if missing:
        return f"FedsiteConfig has no field {missing[0].replace('_', '-')!r} yet"
    try:
        return base.replace(**changes).validate()
    except ConfigError as err:
        return str(err)


def fleet(args: argparse.Namespace, folder: Path) -> str:
    """The experiment file the row runs on: `--experiment`, with `--battery-wh` for its battery devices."""
    if not args.experiment or args.battery_wh <= 0:
        return args.experiment
    values = tomllib.loads(Path(args.experiment).read_text())
    for profile in values.get("profiles", []):
        if profile.get("battery-wh", 0) > 0:
            profile["battery-wh"] = args.battery_wh
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fleet.toml"
    path.write_text(tomli_w.dumps(values))
    return str(path)


def summarize(folder: Path) -> dict:
    """The row's numbers from its results folder."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    clients = [json.loads(line) for line in (folder / "clients.jsonl").read_text().splitlines()]
    trained = [c for c in clients if c.get("status") == "accepted" and "phase" not in c]

    def total(key: str) -> float | None:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return float(sum(values)) if values else None

    # per-client selection: a client's own lowest active block is where its backward stops
    lowest = [r.get("client_lowest_active_layer", r["lowest_active_layer"]) for r in rows if "lowest_active_layer" in r]
    shares = [r["active_share"] for r in rows if "active_share" in r]
    return {
        "exact_match": rows[-1]["eval_accuracy"],
        "eval_loss": rows[-1]["eval_loss"],
        "train_seconds": sum(c.get("train_seconds", 0.0) for c in trained),
        "train_steps": sum(c.get("steps", 0) for c in trained),
        "train_gflops": sum(c.get("train_gflops", 0.0) for c in trained),
        "upload_bytes": total("upload_bytes") or 0.0,
        "energy_joules": total("energy_joules"),
        "gco2e": total("gco2e"),
        "active_share": statistics.mean(shares) if shares else 1.0,
        "lowest_active_layer": statistics.mean(lowest) if lowest else 0.0,
        "rounds": len(rows),
        "jain_index": next((r["jain_index"] for r in reversed(rows) if isinstance(r.get("jain_index"), (int, float))), None),
    }


def federated(args: argparse.Namespace) -> dict[str, dict]:
    out = Path(args.out)
    chosen = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = sorted(set(chosen) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    results: dict[str, dict] = {}
    for key in chosen:
        label, changes = ROWS[key]
        folder = out / key
        done = folder / "result.json"
        if done.exists():
            results[key] = json.loads(done.read_text())
            print(f"[resource-aware] {label}: done before, read from {done}")
            continue
        config = row_config(args, changes, folder)
        if isinstance(config, str):
            print(f"[resource-aware] skipping {label}: {config}")
            continue
        print(f"[resource-aware] running {label} -> {folder}", flush=True)
        simulate(config)
        results[key] = {"label": label, **summarize(Path(config.out))}
        folder.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(results[key], indent=1))
    return results


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "n/a"
    return f"{value / reference:.2f}x"


def number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def seed_folder(out: str, seed: int) -> str:
    return out if seed == 0 else f"{out}-seed{seed}"


def seed_means(per_seed: dict[int, dict[str, dict]]) -> None:
    """Each row's mean over the seeds it ran with, its differences to plain paired by seed (and their range)."""
    keys = list(dict.fromkeys(k for results in per_seed.values() for k in results))
    print(f"\n## Mean over seeds {', '.join(map(str, per_seed))} (differences to plain FedAvg-LoRA paired by seed: mean [min, max])\n")
    print("| row | seeds | exact match | Δ EM | eval loss | Δ loss | upload vs plain | energy vs plain |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for key in keys:
        runs = [(results[key], results.get("plain")) for results in per_seed.values() if key in results]
        paired = [(r, p) for r, p in runs if p is not None]

        def spread(values: list[float]) -> str:
            return f"{statistics.mean(values):+.3f} [{min(values):+.3f}, {max(values):+.3f}]" if values else "n/a"

        def mean_ratio(field: str) -> str:
            values = [r[field] / p[field] for r, p in paired if r.get(field) is not None and p.get(field)]
            return f"{statistics.mean(values):.2f}x" if values else "n/a"

        print(f"| {runs[0][0]['label']} | {len(runs)} | {statistics.mean(r['exact_match'] for r, _ in runs):.3f} | {spread([r['exact_match'] - p['exact_match'] for r, p in paired])} | "
              f"{statistics.mean(r['eval_loss'] for r, _ in runs):.3f} | {spread([r['eval_loss'] - p['eval_loss'] for r, p in paired])} | {mean_ratio('upload_bytes')} | {mean_ratio('energy_joules')} |")


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    if args.seeds:
        out = args.out
        per_seed = {}
        for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
            args.seed, args.out = seed, seed_folder(out, seed)
            print(f"\n# seed {seed} ({args.out})", flush=True)
            per_seed[seed] = federated(args)
            table(args, per_seed[seed])
        seed_means(per_seed)
        return
    if not args.skip_timing:
        rows = step_times(args)
        print(f"\n## Client step time vs where the active modules sit ({args.model}, LoRA {args.lora_targets}, batch {args.batch_size}; median of {args.timing_repeats} x {args.timing_steps} steps)\n")
        print("| active modules | s/step | vs all | lowest active block | FLOPs vs all |\n|---|---:|---:|---:|---:|")
        reference = rows[0][1]
        for name, seconds, lowest, model in rows:
            print(f"| {name} | {seconds:.3f} | {seconds / reference:.2f}x | {lowest} | {model:.2f}x |")
    table(args, federated(args))


def table(args: argparse.Namespace, results: dict[str, dict]) -> None:
    """The rows of one seed, with ratios to its plain row."""
    if not results:
        return
    plain = results.get("plain")
    energy_basis = f"compute energy from counted FLOPs at {args.simulated_gflops:g} GFLOP/s x profile speed" if args.simulated_gflops > 0 else "compute energy from measured seconds"
    energy_basis += f"; energy-aware row: K={args.fairness_rounds}, g={args.fairness_weight:g}, batteries " + (f"{args.battery_wh:g} Wh" if args.battery_wh > 0 else "as in the experiment")
    print(f"\n## The same federated run per row ({energy_basis}; {args.clients} clients, Dirichlet alpha {args.dirichlet_alpha:g}, {args.fraction_train:g} sampled per round, "
          f"{args.rounds} rounds, {args.local_steps} client steps, batch {args.batch_size}, {args.eval_examples} held-out examples)\n")
    print("Ratios are to plain FedAvg-LoRA" + ("" if plain else " (not run: no ratios)") + "; training seconds are summed over the clients that trained.\n")
    print("| row | exact match | Δ EM | eval loss | Δ loss | client train s | s/step | vs plain | client GFLOPs | vs plain | upload MB | vs plain | energy J | vs plain | gCO2e | vs plain | active share | lowest active block | Jain's index |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results.values():
        ref = plain or {}
        per_step = r["train_seconds"] / max(1, r["train_steps"])
        ref_step = ref["train_seconds"] / max(1, ref["train_steps"]) if ref else None
        d_em = f"{r['exact_match'] - ref['exact_match']:+.3f}" if ref else "n/a"
        d_loss = f"{r['eval_loss'] - ref['eval_loss']:+.3f}" if ref else "n/a"
        print(f"| {r['label']} | {r['exact_match']:.3f} | {d_em} | {r['eval_loss']:.3f} | {d_loss} | {r['train_seconds']:.1f} | {per_step:.3f} | {ratio(per_step, ref_step)} | "
              f"{number(r.get('train_gflops'), '.0f')} | {ratio(r.get('train_gflops'), ref.get('train_gflops'))} | {r['upload_bytes'] / 1e6:.2f} | {ratio(r['upload_bytes'], ref.get('upload_bytes'))} | {number(r['energy_joules'], '.1f')} | {ratio(r['energy_joules'], ref.get('energy_joules'))} | "
              f"{number(r['gco2e'], '.4f')} | {ratio(r['gco2e'], ref.get('gco2e'))} | {r['active_share']:.2f} | {r['lowest_active_layer']:.1f} | {number(r.get('jain_index'), '.3f')} |")


if __name__ == "__main__":
    main()
