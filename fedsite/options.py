"""The run options of `fedsite simulate` and `fedsite coordinator`, generated from FedsiteConfig.

One option per config field, grouped under headings in `--help`; a field's aliases
(`finetune.config.ALIASES`, e.g. `--rounds`) are options too, and every one of them is also a
TOML key of an experiment file. The spelling the user typed is kept so errors can name it.
Imports here stay light: `fedsite --help` loads neither torch nor Flower.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from finetune.choices import CHOICES
from finetune.config import FedsiteConfig, field_help, field_names, from_mapping

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
    "num-server-rounds": "federated rounds",
    "fraction-train": "share of clients sampled for training each round",
    "min-train-clients": "minimum clients sampled for training",
    "fraction-evaluate": "share of clients sampled for federated evaluation (0 = central only)",
    "round-timeout": "seconds to wait for client replies each round",
    "aggregation": "aggregation rule (aggregation/rules.py)",
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
    "upload-codec": "encoding of the client's update on the wire: fp32, fp16, int8, 4bit (NF4 blockwise) or adaptive (each LoRA module at fp16, int8 or 4bit by its share of the update's norm)",
    "upload-budget-mb": "adaptive codec: most MB of a client's upload; the least important modules are sent coarser to fit (0 = no budget)",
    "client-selection": "who trains each round: uniform (Flower's sample of --fraction-train) or energy-aware (batteries above the threshold, low-carbon power, within --selection-fairness-rounds)",
    "module-selection": "LoRA modules clients train and send: all, or kill-revive (DLoRA: only the most sensitive share, killed ones periodically revived)",
    "kr-active-share": "kill-revive: share of the LoRA modules active each round (e.g. 0.25)",
    "kr-score": "kill-revive: a module's sensitivity, update-norm (L2 norm of its aggregated update), update-rms (that norm per value) or gradient (every module's gradient norm at each client's first step)",
    "kr-lowest-block": "kill-revive: modules in blocks below this one stay killed, so the clients' backward stops there (0 = any block)",
    "kr-revive-every": "kill-revive: every n-th round half the active slots go to the longest-killed modules (0 = never)",
    "kr-assign": "kill-revive: shared (one selection per round, works with --secure) or per-client (each client its own, scored by its own updates; fedavg/fedprox)",
    "kr-prior": "kill-revive per client: none (a client tries the modules it has not scored in a seeded order) or federation (ranks them by the mean score other clients measured)",
    "selection-fairness-rounds": "energy-aware selection: every client is selected at least once every this many rounds",
    "selection-battery-threshold": "energy-aware selection: prefer clients whose battery is above this fraction of its capacity",
    "selection-objective": "energy-aware selection: among charged clients prefer the lowest expected gCO2e (carbon) or joules (energy) per round",
    "selection-fairness-weight": "energy-aware selection: weigh a client's expected cost by (1 + times selected)^g, so cheap clients do not take every slot (default 1.5; 0 = pure greedy)",
    "simulated-gflops": "simulation: a client's compute time (energy, stragglers) is its counted training GFLOPs over this many GFLOP/s times its profile's speed, the same under any load (0 = measured seconds over the speed)",
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
    "emulator-stride": "offsite tuning: with --emulator-keep 0, keep every n-th middle block in the emulator",
    "emulator-keep": "offsite tuning: keep this share of the middle blocks, evenly spaced (0.8, the default, drops every fifth: FedBiOT's mild compression; 0 = every --emulator-stride-th)",
    "emulator-fill": "offsite tuning: dropped middle blocks are 'drop'ped (shallower emulator) or 'share'd (depth kept: each dropped slot runs its nearest kept block; same bytes, full-depth compute)",
    "emulator-select": "offsite tuning: which middle blocks the emulator keeps: every --emulator-stride-th ('stride') or as many, one per run of blocks with similar outputs on the public distillation set ('similarity', CRaSh; a shared slot runs its run's block)",
    "emulator-align-steps": "offsite tuning: alignment steps of the emulator toward the backbone at the coordinator every round, with the current adapter in both (FedBiOT); sent to clients as a signed low-rank refresh of the middle (0 = off)",
    "emulator-align-rank": "offsite tuning: rank of the per-round refresh's LoRA factors on the emulator's frozen middle",
    "emulator-align-lr": "offsite tuning: learning rate of the per-round alignment (AdamW on the refresh's factors)",
    "offsite-proximal-mu": "offsite tuning: emulator clients add lambda * ||adapter - round-start adapter||^2 to their loss (drift control, FedBiOT uses 1; 0 = off)",
    "emulator-quantize": "offsite tuning: storage of the emulator's frozen middle: none, int8 or nf4",
    "emulator-distill-steps": "offsite tuning: distillation steps of the emulator's middle toward the full model",
    "emulator-distill-objective": "offsite tuning: distil on 'logits' (KL), 'hidden' (MSE into the top adapter) or 'logits+hidden' (both, dimensions standardized)",
    "emulator-distill-rank": "offsite tuning: > 0 distils low-rank factors on the emulator's middle, folded into it before quantizing (0 = every middle weight trains)",
    "emulator-distill-data": "offsite tuning: examples the coordinator distils on (.jsonl or datasets folder; default: built-in task families, own seed)",
    "offsite-train": "offsite tuning: clients train 'lora' on the adapter blocks or the adapter 'blocks' themselves (the paper's; learns far more)",
    "offsite-lora-targets": "offsite tuning: modules of the adapter blocks that get LoRA when --offsite-train lora (default: all seven linears)",
    "offsite-lr": "offsite tuning: learning rate of emulator clients (0 = --lr for lora, 1e-4 for blocks)",
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

# help headings: field keys in the order shown; a field not listed lands under "other options"
GROUPS: dict[str, tuple[str, ...]] = {
    "model and LoRA": ("model", "lora-rank", "lora-alpha", "lora-dropout", "lora-targets", "quantize", "device", "dtype"),
    "data": ("data", "train-per-task", "test-per-task", "test-fraction", "max-seq-len", "seed"),
    "federation": ("clients", "num-server-rounds", "fraction-train", "min-train-clients", "fraction-evaluate", "round-timeout",
                   "local-steps", "local-epochs", "batch-size", "lr", "weight-decay", "max-grad-norm",
                   "upload-codec", "upload-budget-mb", "upload-topk", "error-feedback", "eval-examples", "client-eval-examples", "max-new-tokens"),
    "aggregation": ("aggregation", "server-lr", "server-momentum", "trim-fraction", "proximal-mu", "max-update-norm",
                    "max-update-norm-multiple", "max-update-mb", "max-client-examples", "max-weight-share"),
    "privacy": ("dp", "noise-multiplier", "target-epsilon", "delta", "dp-max-grad-norm", "epsilon-budget", "dp-clip-norm", "dp-adaptive-clip"),
    "security": ("secure", "secure-num-shares", "secure-threshold", "secure-clip-range", "secure-quantization-range", "secure-max-weight"),
    "offsite": ("emulator-share", "emulator-package", "emulator-adapter-layers", "emulator-stride", "emulator-keep", "emulator-fill", "emulator-select", "emulator-quantize",
                "emulator-distill-steps", "emulator-distill-objective", "emulator-distill-rank", "emulator-distill-data", "offsite-train",
                "offsite-lora-targets", "offsite-lr", "offsite-proximal-mu", "emulator-align-steps", "emulator-align-rank", "emulator-align-lr", "artifact-url"),
    "population": ("partitioning", "dirichlet-alpha", "shards-per-client", "partition-size-sigma", "experiment"),
    "resources and energy": ("module-selection", "kr-active-share", "kr-score", "kr-revive-every", "kr-lowest-block", "kr-assign", "kr-prior", "client-selection", "selection-fairness-rounds", "selection-battery-threshold", "selection-objective", "selection-fairness-weight", "simulated-gflops"),
    "simulation engine": ("workers", "gpus-per-worker", "ray-address"),
    "output": ("out",),
}
SPELLING = "option_spelling"  # Namespace attribute: field key -> the option string the user typed


class Spelled(argparse.Action):
    """Store the value and remember which of the field's option strings was typed."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        spelled = dict(getattr(namespace, SPELLING, None) or {})
        spelled[self.dest] = option_string or f"--{self.dest}"
        setattr(namespace, SPELLING, spelled)


def choices(key: str) -> tuple[str, ...]:
    """The accepted values of a choice field, from the code that checks them."""
    if key == "aggregation":
        from aggregation.rules import RULES  # numpy only

        return tuple(RULES)
    return CHOICES.get(key, ())


def option_help(key: str, default: Any) -> str:
    text = FIELD_HELP.get(key, key)
    values = choices(key)
    if values and not all(value in text for value in values):
        text += f"; one of: {', '.join(values)}"
    if "default" not in text:  # a text that explains its default says it once
        text += f" (default: {default if default != '' else 'none'})"
    return text.replace("%", "%%")


def group_of(key: str) -> str:
    return next((heading for heading, keys in GROUPS.items() if key in keys), "other options")


class LazyHelp:
    """A help text built only when help is printed: listing the aggregation rules imports
    numpy, which `fedsite --help` and every other command skip."""

    def __init__(self, build: functools.partial) -> None:
        self.build = build

    def __str__(self) -> str:
        return self.build()

    def strip(self) -> str:  # argparse tests a help text with .strip() before formatting it
        return str(self).strip()


class LazyHelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        return str(action.help)


def add_config_options(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One option per config field (plus aliases) under its heading; returns the groups by heading."""
    parser.formatter_class = LazyHelpFormatter
    groups = {heading: parser.add_argument_group(heading) for heading in (*GROUPS, "other options")}
    names = field_names()
    for key, (default, kind) in field_help().items():
        flag = {"nargs": "?", "const": "true"} if kind == "bool" else {}  # `--secure` alone means true
        options = [f"--{name}" for name in sorted(names[key], key=len)]  # the short alias (--rounds) first
        groups[group_of(key)].add_argument(*options, dest=key, default=None, action=Spelled, metavar=kind.upper(), help=LazyHelp(functools.partial(option_help, key, default)), **flag)
    groups["population"].add_argument("--config", metavar="TOML", help="experiment file: keys are the options above (without --; old names still work), plus optional [population], [[profiles]] and [sweep] tables (see simulations/experiments/); flags override it")
    if not groups["other options"]._group_actions:
        parser._action_groups.remove(groups["other options"])
    return groups


def option_labels(args: argparse.Namespace) -> dict[str, str]:
    """Field key -> the option as the user typed it (`--rounds`), for error messages."""
    return dict(getattr(args, SPELLING, None) or {})


def config_from_args(args: argparse.Namespace) -> FedsiteConfig:
    base = FedsiteConfig()
    if args.config:
        from simulations.experiment import load_experiment  # loads Flower's records; only with --config

        base = load_experiment(args.config).config
    values: dict[str, Any] = {key: getattr(args, key) for key in field_help() if getattr(args, key) is not None}
    return from_mapping(values, base, option_labels(args))
