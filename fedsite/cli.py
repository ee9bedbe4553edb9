"""The `fedsite` command: argument parsing only; each subcommand calls into its package."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from finetune.logs import setup_logging
from finetune.config import DEFAULT_DISTILL_OBJECTIVE, DISTILL_OBJECTIVES, EMULATOR_FILLS, ConfigError, FedsiteConfig, field_help, from_mapping
from fedsite.service_cli import add_service_parsers

FIELD_HELP = {
    "model": "backbone: 'smollm2' (embedded, default), 'tiny' (random Llama for tests) or a local model folder",
    "lora-rank": "LoRA rank r",
    "lora-alpha": "LoRA alpha (scaling = alpha / r)",
    "lora-dropout": "LoRA dropout",
    "lora-targets": "comma-separated module names that get LoRA",
    "data": "'builtin' (generated task suite), a .jsonl file (instruction/input/output) or a datasets folder",
    "train-per-task": "built-in suite: training examples per task family",
    "test-per-task": "built-in suite: held-out examples per task family",
    "test-fraction": "user data: share held out for evaluation",
    "partitioning": "how data is split over clients: iid, dirichlet or shards",
    "dirichlet-alpha": "Dirichlet concentration over task families (smaller = more skewed)",
    "shards-per-client": "shards partitioning: shards dealt to each client",
    "partition-size-sigma": "iid quantity skew: per-client data sizes drawn lognormal with this sigma (0 = equal sizes)",
    "max-seq-len": "tokens per training example (prompt is cut from the left)",
    "seed": "seed for data, partitions and LoRA initialisation",
    "clients": "number of simulated clients",
    "num-server-rounds": "federated rounds (alias --rounds)",
    "fraction-train": "share of clients sampled for training each round",
    "min-train-clients": "minimum clients sampled for training",
    "fraction-evaluate": "share of clients sampled for federated evaluation (0 = central only)",
    "round-timeout": "seconds to wait for client replies each round",
    "aggregation": "rule: fedavg, fedprox, fedavgm, fedadam, fedyogi, ffa-lora, rolora, hetlora, median, trimmed-mean",
    "server-lr": "server learning rate (eta) of fedadam and fedyogi",
    "server-momentum": "server momentum of fedavgm",
    "trim-fraction": "trimmed-mean: share of values cut from each side",
    "proximal-mu": "fedprox: weight of the proximal term mu/2 ||w - w_global||^2 on clients",
    "max-update-norm": "norm bound on a client update's L2 distance from the global adapter: < 0 adaptive (--max-update-norm-multiple x the round's median), 0 off, > 0 this absolute bound",
    "max-update-norm-multiple": "adaptive norm bound: reject an update whose norm exceeds this multiple of the round's median update norm (with two, the median of them and the previous round's reference, else the smaller; with one, the previous round's)",
    "max-update-mb": "reject a client update larger than this many MB, checked before it is decoded (0 = off)",
    "max-client-examples": "cap on a client's reported example count, i.e. its aggregation weight (0 = no cap; simulated clients are also capped at their partition's size)",
    "max-weight-share": "cap on any one client's share of the aggregation weights, the excess going to the others (0 = off; e.g. 0.5)",
    "local-steps": "optimizer steps per client per round",
    "local-epochs": "if > 0, whole passes over the client's data instead of --local-steps",
    "batch-size": "examples per local step",
    "lr": "AdamW learning rate on clients",
    "weight-decay": "AdamW weight decay",
    "max-grad-norm": "gradient clipping norm (0 = off)",
    "upload-codec": "encoding of the client's update on the wire: fp32, fp16, int8 or 4bit (NF4 blockwise)",
    "upload-topk": "send only this fraction of largest-magnitude entries per tensor (0 = dense)",
    "error-feedback": "clients keep what compression dropped and add it to their next update",
    "dp": "differential privacy: none, local (DP-SGD on clients with Opacus) or client (user-level DP at the coordinator)",
    "noise-multiplier": "Gaussian noise multiplier (local: on clipped per-sample gradients; client: on the clipped mean)",
    "target-epsilon": "local DP: calibrate the noise so a client's whole participation costs this epsilon (0 = use --noise-multiplier)",
    "delta": "DP delta",
    "dp-max-grad-norm": "local DP: per-sample gradient clipping norm",
    "epsilon-budget": "local DP: a client declines to train once its spent epsilon reaches this (0 = --target-epsilon, else none)",
    "dp-clip-norm": "client DP: clipping bound on each client's update (L2 distance from the global adapter)",
    "dp-adaptive-clip": "client DP: adapt the clipping bound to the median update norm (Andrew et al. 2021)",
    "secure": "secure aggregation with Flower's SecAgg+: the coordinator sees only the sum of masked updates (fedavg, fedprox, fedavgm, fedadam, fedyogi, ffa-lora, rolora)",
    "secure-num-shares": "SecAgg+: clients each client secret-shares its keys with, as a share of the sampled clients (<= 1) or a count",
    "secure-threshold": "SecAgg+: shares needed to unmask, as a share of --secure-num-shares (<= 1) or a count; fewer survivors and the round keeps the old adapter",
    "secure-clip-range": "SecAgg+: each weighted array entry is clipped to [-r, r] before quantization (a client whose update exceeds it drops out)",
    "secure-quantization-range": "SecAgg+: quantization levels per entry (error of the mean about range*2/levels)",
    "secure-max-weight": "SecAgg+: largest client weight (training examples); heavier clients are capped",
    "quantize": "QLoRA clients: load the frozen backbone in nf4 or int8 with bitsandbytes (none = fp32)",
    "emulator-share": "offsite tuning: share of simulated clients that get a signed emulator instead of the backbone (0 = none)",
    "emulator-package": "offsite tuning: use this package from `fedsite emulator build` (default: build one into OUT/emulator)",
    "emulator-adapter-layers": "offsite tuning: trainable blocks kept at each end of the emulator (0 = 2, or 1 below 8 blocks)",
    "emulator-stride": "offsite tuning: keep every n-th middle block in the emulator",
    "emulator-fill": "offsite tuning: dropped middle blocks are 'drop'ped (shallower emulator) or 'share'd (depth kept: each dropped slot runs its nearest kept block; same bytes, full-depth compute)",
    "emulator-quantize": "offsite tuning: storage of the emulator's frozen middle: none, int8 or nf4",
    "emulator-distill-steps": "offsite tuning: distillation steps of the emulator's middle toward the full model",
    "emulator-distill-objective": "offsite tuning: distil on 'logits' (KL), 'hidden' (MSE into the top adapter) or 'logits+hidden' (both, dimensions standardized)",
    "emulator-distill-data": "offsite tuning: examples the coordinator distils on (.jsonl or datasets folder; default: built-in task families, own seed)",
    "offsite-train": "offsite tuning: clients train 'lora' on the adapter blocks or the adapter 'blocks' themselves (the paper's; learns far more)",
    "offsite-lora-targets": "offsite tuning: modules of the adapter blocks that get LoRA when --offsite-train lora (default: all seven linears)",
    "offsite-lr": "offsite tuning: learning rate of emulator clients (0 = --lr for lora, 1e-4 for blocks)",
    "emulator-align-steps": "offsite tuning: alignment steps of the emulator toward the backbone at the coordinator every round, with the current adapter in both (FedBiOT); sent to clients as a signed low-rank refresh of the middle (0 = off)",
    "emulator-align-rank": "offsite tuning: rank of the per-round refresh's LoRA factors on the emulator's frozen middle",
    "offsite-proximal-mu": "offsite tuning: emulator clients add lambda * ||adapter - round-start adapter||^2 to their loss (drift control, FedBiOT uses 1; 0 = off)",
    "artifact-url": "deployment: HOST:PORT of the coordinator's artifact service; emulator packages go to OUT/artifacts and clients fetch them by reference (serve it with `fedsite coordinator --artifacts OUT/artifacts`)",
    "eval-examples": "held-out examples in the coordinator's evaluation",
    "client-eval-examples": "test examples per client in federated evaluation",
    "max-new-tokens": "tokens generated per answer in exact-match evaluation",
    "out": "results folder (metrics.jsonl, adapter/, summary.md, ...)",
    "workers": "simulation worker processes (each holds one backbone)",
    "gpus-per-worker": "simulation: GPU share of each worker, e.g. 0.25 for four workers per GPU (0 = auto: with a CUDA --device the visible GPUs are shared by --workers, else none)",
    "ray-address": "simulation: join the running Ray cluster at HOST:PORT (or 'auto') instead of starting a private Ray ('' = $RAY_ADDRESS if set)",
    "device": "where models train and evaluate: auto (first CUDA GPU, else CPU), cpu, cuda, cuda:N or mps",
    "dtype": "dtype of the frozen backbone: auto (bf16 on a CUDA GPU that supports it, else fp32), fp32, bf16 or fp16; LoRA and aggregation stay fp32",
    "experiment": "experiment TOML whose [population] and [[profiles]] decide each client's package, dropouts and deadline ('' = none; set by --config)",
}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field, generated from the dataclass so none is forgotten."""
    for key, (default, kind) in field_help().items():
        names = [f"--{key}"] + (["--rounds"] if key == "num-server-rounds" else [])
        flag = {"nargs": "?", "const": "true"} if kind == "bool" else {}  # `--secure` alone means true
        parser.add_argument(*names, dest=key, default=None, metavar=kind.upper(), help=f"{FIELD_HELP.get(key, key)} (default: {default})", **flag)
    parser.add_argument("--config", metavar="TOML", help="experiment file: keys are the options above, plus optional [population], [[profiles]] and [sweep] tables (see simulations/experiments/); flags override it")


def config_from_args(args: argparse.Namespace) -> FedsiteConfig:
    from simulations.experiment import load_experiment

    base = load_experiment(args.config).config if args.config else FedsiteConfig()
    values: dict[str, Any] = {key: getattr(args, key) for key in field_help() if getattr(args, key) is not None}
    return from_mapping(values, base)


def start_live_dashboard(address: str | None, certs: str | None, out: str) -> Any:
    """`--dashboard [HOST:PORT]`: serve the dashboard over the run's folder from a thread of this
    process (it stops with the run) and print its address, the only place the token appears."""
    if address is None:
        return None
    from dashboard.server import announce_line, start_dashboard

    board = start_dashboard([], address, certs, live=[out])
    print(announce_line(board.url, board.token), flush=True)
    return board


def add_dashboard_option(parser: argparse.ArgumentParser, certs_option: bool) -> None:
    from dashboard import DEFAULT_ADDRESS

    where = "--dashboard-certs" if certs_option else "--certs"
    parser.add_argument("--dashboard", nargs="?", const=DEFAULT_ADDRESS, default=None, metavar="HOST:PORT",
                        help=f"serve the live dashboard of this run (default address {DEFAULT_ADDRESS}; off loopback it needs TLS from {where} and prints an access token)")
    if certs_option:
        parser.add_argument("--dashboard-certs", default=None, metavar="DIR", help="TLS for a dashboard off loopback: a folder with server.pem and server.key (`fedsite certs --out DIR`)")


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.runner import simulate

    config = config_from_args(args)
    start_live_dashboard(args.dashboard, args.dashboard_certs, config.out)
    out = simulate(config, verbose=args.verbose)
    print(f"results: {out}  (metrics.jsonl, summary.md, curves.png, adapter/)")
    return 0


def cmd_emulator_build(args: argparse.Namespace) -> int:
    from emulator.cli import build_command

    quantize = None if args.quantize == "none" else args.quantize
    build_command(args.model, args.out, args.adapter_layers, args.stride, quantize, args.key, distill_steps=args.distill_steps, distill_data=args.distill_data, distill_objective=args.distill_objective, device=args.device, fill=args.fill)
    return 0


def cmd_emulator_verify(args: argparse.Namespace) -> int:
    from emulator.cli import verify_command

    return verify_command(args.dir, args.public_key)


def cmd_report(args: argparse.Namespace) -> int:
    from simulations.report import write_report

    print(f"report: {write_report(args.runs, args.out)}")
    return 0


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="compare results folders: PNG plots and a markdown table", description="Write accuracy, loss, bytes, participation and time-to-accuracy plots plus report.md and report.json comparing the given runs.")
    report.add_argument("runs", nargs="+", help="results folders written by `fedsite simulate` (metrics.jsonl inside)")
    report.add_argument("--out", required=True, help="folder for the plots, report.md and report.json")
    report.set_defaults(func=cmd_report)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from dashboard.server import serve_dashboard

    serve_dashboard(args.folders, args.address, args.certs)
    return 0


def add_dashboard_parser(sub: argparse._SubParsersAction) -> None:
    from dashboard import DEFAULT_ADDRESS

    board = sub.add_parser("dashboard", help="serve a read-only web dashboard over results folders", description="Serve a read-only web dashboard (overview, curves, rounds, clients, privacy, offsite) over finished or running results folders; a sweep folder expands into its runs. It updates by itself as the runs write. Off loopback it needs TLS (--certs) and prints an access token.")
    board.add_argument("folders", nargs="+", metavar="DIR", help="results folders (metrics.jsonl inside) or sweep folders holding them")
    board.add_argument("--address", default=DEFAULT_ADDRESS, metavar="HOST:PORT", help=f"where to listen (default: {DEFAULT_ADDRESS}; port 0 picks a free one)")
    board.add_argument("--certs", default=None, metavar="DIR", help="TLS certificate folder (server.pem, server.key, as `fedsite certs --out DIR` writes); required off loopback")
    board.set_defaults(func=cmd_dashboard)


def cmd_sweep(args: argparse.Namespace) -> int:
    from simulations.sweep import run_sweep

    outcome = run_sweep(args.experiment, args.out, dry_run=args.dry_run)
    for run, status in outcome:
        print(f"{status:>10}  {run.folder}")
    failed = [run for run, status in outcome if status.startswith("failed")]
    print(f"sweep: {len(outcome)} runs, {len(failed)} failed; compare them with `fedsite report {args.out}/* --out REPORT`")
    return 1 if failed else 0


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="run an experiment's [sweep] grid, one results folder per run", description="Run every combination of the experiment file's [sweep] table once per seed, each as its own `fedsite simulate` under OUT/NAME. Finished runs (summary.json present) are skipped, so re-running resumes.")
    sweep.add_argument("experiment", help="experiment TOML with a [sweep] table (keys: options, values: lists; seeds = [...])")
    sweep.add_argument("--out", required=True, help="folder that gets one results folder per run")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and which are finished, run nothing")
    sweep.set_defaults(func=cmd_sweep)


def add_emulator_parser(sub: argparse._SubParsersAction) -> None:
    emulator = sub.add_parser("emulator", help="build or verify an offsite emulator package", description="Offsite-tuning emulators: a compressed stand-in of the backbone with trainable adapter blocks.")
    actions = emulator.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="build, sign and write an emulator package", description="Keep the first and last --adapter-layers blocks (trainable), drop middle blocks by --stride, sign the package with Ed25519.")
    build.add_argument("--model", default="smollm2", help="backbone: smollm2, tiny or a model folder (default: smollm2)")
    build.add_argument("--out", required=True, help="package folder to write")
    build.add_argument("--adapter-layers", type=int, default=None, help="adapter blocks kept at each end (default: 2, or 1 below 8 blocks)")
    build.add_argument("--stride", type=int, default=2, help="keep every n-th middle block (default: 2; 1 keeps all)")
    build.add_argument("--fill", choices=list(EMULATOR_FILLS), default="drop", help="dropped middle blocks: 'drop' them (shallower emulator) or 'share' (keep the depth, each dropped slot runs its nearest kept block; same bytes) (default: drop)")
    build.add_argument("--quantize", choices=["none", "int8", "nf4", "4bit"], default="none", help="weight quantization of the frozen middle (default: none)")
    build.add_argument("--distill-steps", type=int, default=0, help="distillation steps of the kept middle toward the full model (default: 0)")
    build.add_argument("--distill-objective", choices=DISTILL_OBJECTIVES, default=DEFAULT_DISTILL_OBJECTIVE, help=f"what the distillation matches (default: {DEFAULT_DISTILL_OBJECTIVE})")
    build.add_argument("--distill-data", default="", help="examples to distil on: .jsonl or datasets folder (default: built-in task families, own seed)")
    build.add_argument("--key", default=None, help="Ed25519 signing key (PEM); default: created once in OUT/../keys/")
    build.add_argument("--device", default="auto", help="where the distillation runs: auto (first CUDA GPU, else CPU), cpu, cuda, cuda:N or mps (default: auto)")
    build.set_defaults(func=cmd_emulator_build)
    verify = actions.add_parser("verify", help="check a package's signature and every file's hash", description="Exit 0 if the package is intact and signed by the key; else non-zero with a one-line reason.")
    verify.add_argument("dir", help="package folder")
    verify.add_argument("--public-key", default=None, help="coordinator's public key (PEM); default: the package's public_key.pem (not a trust anchor)")
    verify.set_defaults(func=cmd_emulator_verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsite", description="Federated and offsite fine-tuning of language models on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    simulate = sub.add_parser(
        "simulate",
        help="run a federation of simulated clients on this machine",
        description="Run a federated LoRA fine-tuning of the backbone with simulated clients (Flower simulation engine).",
    )
    add_config_options(simulate)
    simulate.add_argument("--verbose", action="store_true", help="show Flower's debug logs")
    add_dashboard_option(simulate, certs_option=True)
    simulate.set_defaults(func=cmd_simulate)
    add_emulator_parser(sub)
    add_report_parser(sub)
    add_service_parsers(sub)  # certs, coordinator, client
    add_sweep_parser(sub)
    add_dashboard_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"fedsite: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if type(err).__name__ != "SimulationError":
            raise
        print(f"fedsite: error: {err}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        # Flower's ServerApp thread may still wait for replies that will never come.
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
