"""The `fedsite` command: argument parsing only; each subcommand calls into its package."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from finetune.logs import filter_harmless_warnings, setup_logging
from finetune.config import DEFAULT_DISTILL_OBJECTIVE, DISTILL_OBJECTIVES, EMULATOR_FILLS, EMULATOR_SELECTS, ConfigError, FedsiteConfig
from fedsite.options import add_config_options, config_from_args, option_labels
from fedsite.service_cli import add_service_parsers

DEFAULTS = FedsiteConfig()  # `fedsite emulator build` builds what a run with default options would


def start_live_dashboard(address: str | None, certs: str | None, out: str) -> Any:
    """`--dashboard [HOST:PORT]`: serve the dashboard over the run's folder from a thread of this
    process (it stops with the run) and print its address, the only place the token appears."""
    if address is None:
        return None
    from dashboard.server import announce_line, start_dashboard

    board = start_dashboard([], address, certs, live=[out])
    print(announce_line(board.url, board.token), flush=True)
    return board


def add_dashboard_option(parser: argparse._ActionsContainer, certs_option: bool) -> None:
    from dashboard import DEFAULT_ADDRESS

    where = "--dashboard-certs" if certs_option else "--certs"
    parser.add_argument("--dashboard", nargs="?", const=DEFAULT_ADDRESS, default=None, metavar="HOST:PORT",
                        help=f"serve the live dashboard of this run (default address {DEFAULT_ADDRESS}; off loopback it needs TLS from {where} and prints an access token)")
    if certs_option:
        parser.add_argument("--dashboard-certs", default=None, metavar="DIR", help="TLS for a dashboard off loopback: a folder with server.pem and server.key (`fedsite certs --out DIR`)")


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.preflight import preflight

    config = preflight(config_from_args(args), option_labels(args))  # before torch, Flower or Ray load
    start_live_dashboard(args.dashboard, args.dashboard_certs, config.out)
    from simulations.runner import simulate

    out = simulate(config, verbose=args.verbose)
    print(f"results: {out}  (metrics.jsonl, summary.md, curves.png, adapter/; logs in {out / 'logs'})")
    return 0


def cmd_emulator_build(args: argparse.Namespace) -> int:
    from emulator.cli import build_command

    quantize = None if args.quantize == "none" else args.quantize
    build_command(args.model, args.out, args.adapter_layers, args.stride, quantize, args.key, distill_steps=args.distill_steps, distill_data=args.distill_data, distill_objective=args.distill_objective, distill_rank=args.distill_rank, device=args.device, fill=args.fill, select=args.select, keep=args.keep)
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
    build.add_argument("--stride", type=int, default=DEFAULTS.emulator_stride, help=f"with --keep 0: keep every n-th middle block (default: {DEFAULTS.emulator_stride}; 1 keeps all)")
    build.add_argument("--keep", type=float, default=DEFAULTS.emulator_keep, help=f"keep this share of the middle blocks, evenly spaced (0.8 drops every fifth, FedBiOT's mild compression; 0: every --stride-th) (default: {DEFAULTS.emulator_keep})")
    build.add_argument("--fill", choices=list(EMULATOR_FILLS), default=DEFAULTS.emulator_fill, help=f"dropped middle blocks: 'drop' them (shallower emulator) or 'share' (keep the depth, each dropped slot runs its nearest kept block; same bytes) (default: {DEFAULTS.emulator_fill})")
    build.add_argument("--select", choices=list(EMULATOR_SELECTS), default=DEFAULTS.emulator_select, help=f"which middle blocks to keep: every --stride-th ('stride'), or as many chosen by output similarity on the distillation set, one per run of similar blocks ('similarity', CRaSh) (default: {DEFAULTS.emulator_select})")
    build.add_argument("--quantize", choices=["none", "int8", "nf4", "4bit"], default=DEFAULTS.emulator_quantize, help=f"weight quantization of the frozen middle (default: {DEFAULTS.emulator_quantize})")
    build.add_argument("--distill-steps", type=int, default=DEFAULTS.emulator_distill_steps, help=f"distillation steps of the kept middle toward the full model (default: {DEFAULTS.emulator_distill_steps}; 0: none)")
    build.add_argument("--distill-objective", choices=DISTILL_OBJECTIVES, default=DEFAULT_DISTILL_OBJECTIVE, help=f"what the distillation matches (default: {DEFAULT_DISTILL_OBJECTIVE})")
    build.add_argument("--distill-rank", type=int, default=DEFAULTS.emulator_distill_rank, help=f"> 0: distil rank-r factors on the middle, folded in before quantizing, instead of every middle weight (default: {DEFAULTS.emulator_distill_rank})")
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
    output = add_config_options(simulate)["output"]
    output.add_argument("--verbose", action="store_true", help="also show Flower, Ray, transformers and bitsandbytes logs on the console (they always go to OUT/logs/)")
    add_dashboard_option(output, certs_option=True)
    simulate.set_defaults(func=cmd_simulate)
    add_emulator_parser(sub)
    add_report_parser(sub)
    add_service_parsers(sub)  # certs, coordinator, client
    add_sweep_parser(sub)
    add_dashboard_parser(sub)
    return parser


def own_usage(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's namespace carries its own parser, so an unknown option is shown
    under that command's usage, not the top level's."""
    parser.set_defaults(usage_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                own_usage(child)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    own_usage(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        getattr(args, "usage_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    filter_harmless_warnings()  # e.g. torch.jit's deprecation, raised while torch loads (finetune/logs.py says why each is harmless)
    args = parse(argv)
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
