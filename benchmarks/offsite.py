"""Offsite tuning vs full-model LoRA at one client budget, row by row and resumable.

Every federated row runs the same clients x rounds x local steps (default 10 x 30, FedBiOT's
budget); each row writes OUT/rows/<row>.json and is skipped when that file exists, so a
benchmark too long for one sitting resumes row by row (an interrupted federated run also
resumes from its own checkpoint). Each row prints its wall time.

Rows (`--rows`, comma-separated; default all):
  zero-shot          the backbone as it is
  full-lora          federated LoRA on the full backbone (every client holds it): the reference
  drop, share        offsite clients on an emulator whose dropped middle blocks are dropped / shared
  drop+prox, share+prox   the same with the offsite proximal term (`--proximal-mu`, FedBiOT: 1)
  drop-sim, share-sim     as drop / share, the kept middle blocks chosen by output similarity (CRaSh)
  drop-80, share-80, share-80+prox, share-80+align   the same with FedBiOT's mild compression: 80% of the
                          middle kept (every fifth block dropped) instead of every --stride-th
  share-80-lora           share-80 with offsite clients training LoRA on the adapter blocks, whatever --train says
  drop-80-lora, share-80-lora+prox, share-80-lora+align, drop-80-lora+align   the same LoRA clients, drop / share, with prox / alignment
  drop-80-lora-top        drop-80-lora with LoRA on the top adapter blocks only (the bottom ones frozen, exact)
  drop-80-lora-top+align  the same with per-round alignment: the middle's refresh keeps tracking the backbone
  keep-100-lora           nothing dropped: the middle is only quantized (int8 by default: what quantization
                          alone costs the transfer). With --quantize none --distill-steps 0 the emulator is the
                          backbone itself, so this is the best a plug-in of these LoRA adapter blocks can reach
  keep-100-lora-top       the same with LoRA on the top adapter blocks only: lora-top's ceiling
  drop+align, share+align per-round alignment at the coordinator (FedBiOT, `--align-steps`), shipped
                          as a signed low-rank refresh of the middle; share+align+prox adds the proximal term
  cost-drop, cost-share, cost-drop-80, cost-share-80   emulator bytes / backbone bytes, client step time and peak memory
                          of an emulator client vs a full-model LoRA client

Per federated row: eval loss, exact match and teacher-forced answer-token accuracy of the
plug-in (the emulator-trained adapter in the full backbone) and of the emulator itself; the
table adds the share of full LoRA's eval-loss gain the plug-in recovers,
(zero-shot - plug-in) / (zero-shot - full LoRA), the plug-in minus emulator gap, and the plug-in's
mean eval loss over the last 3 rounds (the final round's alone is noisy).

    python benchmarks/offsite.py                               # SmolLM2, the whole table (hours on 2 cores)
    python benchmarks/offsite.py --rows zero-shot,share --rounds 2 --local-steps 5   # a slice
    python benchmarks/offsite.py --model tiny --rounds 1 --local-steps 2             # plumbing check
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
from typing import NamedTuple

import torch
from safetensors.numpy import load_file

from client.offsite import OffsiteSpec, offsite_model
from emulator.build import load_adapter_state
from emulator.keys import load_public_key, public_key_pem
from emulator.offsite import base_model
from emulator.package import load_package
from emulator.refresh import attach_refresh
from finetune.backbone import load_backbone
from finetune.batches import encode_example, fixed_batches
from finetune.cache import lora_model
from finetune.config import DEFAULT_DISTILL_OBJECTIVE, DISTILL_OBJECTIVES, FedsiteConfig
from finetune.evaluate import evaluate
from finetune.loss import answer_logits
from finetune.sources import central_eval_set, run_splits
from finetune.train import TrainSettings, train

MILD = 0.8  # the "-80" rows keep this share of the middle blocks (FedBiOT's mild compression: 20% dropped)


class Row(NamedTuple):
    """What a federated row sets on top of the command line's budget."""

    share: float = 1.0  # emulator share of the clients (0: the full-model LoRA reference)
    fill: str = "drop"
    prox: bool = False  # the offsite proximal term at --proximal-mu
    align: bool = False  # per-round alignment, --align-steps
    select: str = "stride"
    keep: float = 0.0  # share of the middle kept, evenly spaced; 0 = every --stride-th
    train: str = ""  # what offsite clients train; "" = --train


FEDERATED = {
    "full-lora": Row(share=0.0),
    "drop": Row(),
    "share": Row(fill="share"),
    "drop+prox": Row(prox=True),
    "share+prox": Row(fill="share", prox=True),
    "drop+align": Row(align=True),
    "share+align": Row(fill="share", align=True),
    "share+align+prox": Row(fill="share", prox=True, align=True),
    "drop-sim": Row(select="similarity"),
    "share-sim": Row(fill="share", select="similarity"),
    "drop-80": Row(keep=MILD),
    "share-80": Row(fill="share", keep=MILD),
    "share-80-lora": Row(fill="share", keep=MILD, train="lora"),
    "share-80+prox": Row(fill="share", keep=MILD, prox=True),
    "share-80+align": Row(fill="share", keep=MILD, align=True),
    "drop-80-lora": Row(keep=MILD, train="lora"),
    "share-80-lora+prox": Row(fill="share", keep=MILD, train="lora", prox=True),
    "share-80-lora+align": Row(fill="share", keep=MILD, train="lora", align=True),
    "drop-80-lora+align": Row(keep=MILD, train="lora", align=True),
    "drop-80-lora-top": Row(keep=MILD, train="lora-top"),
    "drop-80-lora-top+align": Row(keep=MILD, train="lora-top", align=True),
    "keep-100-lora": Row(keep=1.0, train="lora"),  # nothing dropped: the quantization alone; with --quantize none, the plug-in's ceiling
    "keep-100-lora-top": Row(keep=1.0, train="lora-top"),  # the same for LoRA on the top adapter blocks only
}
COSTS = {
    "cost-drop": Row(),
    "cost-share": Row(fill="share"),
    "cost-drop-80": Row(keep=MILD),
    "cost-share-80": Row(fill="share", keep=MILD),
    "cost-drop-80-lora": Row(keep=MILD, train="lora"),
    "cost-share-80-lora": Row(fill="share", keep=MILD, train="lora"),
    "cost-drop-80-lora-top": Row(keep=MILD, train="lora-top"),  # no backward below the top adapter blocks
    "cost-share-80-lora+refresh": Row(fill="share", keep=MILD, train="lora", align=True),  # a client holding a rank --align-rank refresh
}
ROWS = ("zero-shot", *FEDERATED, *COSTS)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"rows to run, comma-separated (default: all of {', '.join(ROWS)})")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=30)
    p.add_argument("--adapter-layers", type=int, default=2)
    p.add_argument("--stride", type=int, default=3, help="keep every n-th middle block")
    p.add_argument("--quantize", default="int8", help="storage of the emulator's middle: none, int8 or nf4")
    p.add_argument("--distill-steps", type=int, default=100, help="pre-alignment of the emulator's middle at build time")
    p.add_argument("--distill-objective", default=DEFAULT_DISTILL_OBJECTIVE, choices=DISTILL_OBJECTIVES)
    p.add_argument("--distill-rank", type=int, default=0, help="> 0: distil rank-r factors on the middle, folded in (0: every middle weight)")
    p.add_argument("--distill-data", default="", help="examples to distil on (default: built-in families, own seed)")
    p.add_argument("--train", default="blocks", help="offsite clients train the adapter 'blocks' (the paper's) or 'lora' on them")
    p.add_argument("--offsite-lr", type=float, default=0.0, help="learning rate of the offsite clients (0 = 1e-4 for blocks, the run's lr for lora)")
    p.add_argument("--proximal-mu", type=float, default=1.0, help="lambda of the +prox rows' lambda*||adapter - round-start adapter||^2")
    p.add_argument("--align-steps", type=int, default=10, help="+align rows: alignment steps at the coordinator before every round (FedBiOT: about 10)")
    p.add_argument("--align-rank", type=int, default=4, help="+align rows: rank of the refresh's LoRA factors on the frozen middle")
    p.add_argument("--align-lr", type=float, default=1e-3, help="+align rows: learning rate of the alignment steps")
    p.add_argument("--eval-examples", type=int, default=60)
    p.add_argument("--steps", type=int, default=4, help="cost rows: steps per timing repeat")
    p.add_argument("--repeats", type=int, default=3, help="cost rows: interleaved timing repeats")
    p.add_argument("--out", default="results/bench-offsite")
    p.add_argument("--measure", choices=["full", "emulator"], help=argparse.SUPPRESS)  # child process: peak memory
    p.add_argument("--package", default="", help=argparse.SUPPRESS)  # child process: the emulator package
    p.add_argument("--refresh-rank", type=int, default=0, help=argparse.SUPPRESS)  # child process: the emulator holds a refresh of this rank
    return p.parse_args(argv)


def run_config(args: argparse.Namespace, row: str, spec: Row = Row()) -> FedsiteConfig:
    return FedsiteConfig(
        model=args.model,
        clients=args.clients,
        num_server_rounds=args.rounds,
        local_steps=args.local_steps,
        eval_examples=args.eval_examples,
        emulator_share=spec.share,
        emulator_adapter_layers=args.adapter_layers,
        emulator_stride=args.stride,
        emulator_keep=spec.keep,
        emulator_fill=spec.fill,
        emulator_select=spec.select,
        emulator_quantize=args.quantize,
        emulator_distill_steps=args.distill_steps,
        emulator_distill_data=args.distill_data,
        emulator_distill_objective=args.distill_objective,
        emulator_distill_rank=args.distill_rank,
        offsite_train=spec.train or args.train,
        offsite_lr=args.offsite_lr,
        offsite_proximal_mu=args.proximal_mu if spec.prox else 0.0,
        emulator_align_steps=args.align_steps if spec.align else 0,
        emulator_align_rank=args.align_rank,
        emulator_align_lr=args.align_lr,
        out=str(Path(args.out) / "runs" / row),
    ).validate()


@torch.no_grad()
def answer_token_accuracy(model, tokenizer, examples, max_len: int) -> float:
    """Teacher-forced: share of answer tokens whose greedy next-token prediction is right."""
    model.eval()
    encoded = [encode_example(tokenizer, ex, max_len) for ex in examples]
    right = total = 0
    for batch in fixed_batches(encoded, 16, tokenizer.pad_token_id):
        logits, labels = answer_logits(model, batch)
        mask = labels != -100
        right += int(((logits.argmax(-1) == labels) & mask).sum())
        total += int(mask.sum())
    return right / max(total, 1)


def scores(model, tokenizer, config: FedsiteConfig, prefix: str) -> dict:
    examples = central_eval_set(config)
    result = evaluate(model, tokenizer, examples, config.max_seq_len, config.max_new_tokens)
    return {f"{prefix}_loss": result.loss, f"{prefix}_exact_match": result.accuracy, f"{prefix}_token_accuracy": answer_token_accuracy(model, tokenizer, examples, config.max_seq_len)}


def zero_shot_row(args: argparse.Namespace) -> dict:
    config = run_config(args, "zero-shot", Row(share=0.0))
    model, tokenizer = load_backbone(config.model)
    return scores(model, tokenizer, config, "plug_in")  # "plug_in" columns: the model a user ends up with


def federated_row(args: argparse.Namespace, row: str) -> dict:
    from peft import PeftModel

    from simulations.runner import simulate

    config = run_config(args, row, FEDERATED[row])
    run = simulate(config)
    summary = json.loads((run / "summary.json").read_text())
    backbone, tokenizer = load_backbone(config.model)
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if config.emulator_share == 0.0:  # full-model LoRA: the run's adapter on the backbone
        by_round = [r.get("eval_loss") for r in rounds]
        return {**scores(PeftModel.from_pretrained(backbone, str(run / "adapter")), tokenizer, config, "plug_in"), "plug_in_loss_by_round": by_round, "seconds_federated": summary.get("seconds")}
    off = summary["offsite"]
    out = {"emulator_bytes": off["emulator_bytes"], "backbone_bytes": off["backbone_bytes"], "layer_map": off.get("layer_map")}
    out["refresh_bytes"] = sum(int(r.get("emulator_refresh_bytes") or 0) for r in rounds)  # all rounds, per client
    out["emulator_zero_shot_loss"] = rounds[0].get("emulator_eval_loss")  # the emulator as built (and distilled): how much of the backbone it gives away
    out["plug_in_loss_by_round"] = [r.get("offsite_eval_loss") for r in rounds]
    if any("emulator_align_held" in r for r in rounds):  # +align rows: what each round's alignment kept
        out["align_held_by_round"] = [r.get("emulator_align_held") for r in rounds]
    layer_map = manifest_layer_map_of(run)
    if config.offsite_train == "blocks":
        arrays = load_file(str(run / "offsite_adapter" / "adapter_blocks.safetensors"))
        load_adapter_state(backbone, arrays, layer_map)
        plug_in = backbone
    else:  # LoRA on the adapter blocks: the exported PEFT adapter fits the full backbone
        plug_in = PeftModel.from_pretrained(backbone, str(run / "offsite_adapter"))
    out.update(scores(plug_in, tokenizer, config, "plug_in"))
    if config.offsite_train == "blocks" and not config.emulator_align_steps:  # an aligned emulator's refresh lives only in the run: its own scores
        emulator = load_package(run / "emulator", run / "keys" / "public_key.pem")[0]
        load_adapter_state(emulator, arrays, layer_map)
        out.update(scores(emulator, tokenizer, config, "emulator"))
    else:
        out.update(emulator_loss=summary["final"]["emulator_eval_loss"], emulator_exact_match=summary["final"]["emulator_eval_accuracy"], emulator_token_accuracy=None)
    return out


def manifest_layer_map_of(run: Path):
    from emulator.package import manifest_layer_map, verify_package

    return manifest_layer_map(verify_package(run / "emulator", run / "keys" / "public_key.pem"))


def cost_row(args: argparse.Namespace, row: str) -> dict:
    """Bytes, step time (interleaved repeats, median) and peak RSS (fresh process per kind)."""
    from emulator.cli import build_package

    config = run_config(args, row, COSTS[row])
    folder = Path(config.out)
    package, key_file = folder / "emulator", folder / "keys" / "public_key.pem"
    if not (package / "manifest.sig").is_file():  # no distillation: costs do not depend on it
        build_package(config.model, package, args.adapter_layers, args.stride, None if args.quantize == "none" else args.quantize, folder / "keys" / "signing_key.pem", fill=config.emulator_fill, keep=config.emulator_keep)
    manifest_bytes = load_package(package, key_file)[3]
    refresh_rank = args.align_rank if COSTS[row].align else 0
    models = client_models(config, package, key_file, refresh_rank=refresh_rank)
    seconds = step_seconds(models, run_splits(config)[0], args, config.batch_size, config.max_seq_len)
    memory = {kind: peak_memory_mb(kind, args, package, config.offsite_train, refresh_rank) for kind in ("full", "emulator")}
    return {
        "emulator_bytes": manifest_bytes.emulator_bytes, "backbone_bytes": manifest_bytes.backbone_bytes,
        "byte_ratio": manifest_bytes.emulator_bytes / manifest_bytes.backbone_bytes,
        "step_seconds_full": seconds["full"], "step_seconds_emulator": seconds["emulator"], "step_ratio": seconds["emulator"] / seconds["full"],
        "peak_rss_mb_full": memory["full"], "peak_rss_mb_emulator": memory["emulator"],
    }


def client_models(config: FedsiteConfig, package: Path, key_file: Path, kinds: tuple[str, ...] = ("full", "emulator"), refresh_rank: int = 0) -> dict:
    """(model, tokenizer) of a full-model LoRA client and/or an offsite client, as clients load them
    (`refresh_rank` > 0: the emulator holds a refresh of that rank, as after an aligned round)."""
    models = {}
    if "full" in kinds:
        models["full"] = lora_model(config.model, config.lora_settings(), config.seed)
    if "emulator" in kinds:
        spec = OffsiteSpec(str(package), public_key_pem(load_public_key(key_file)).decode(), config.offsite_train)
        emulator, tokenizer, layer_map = offsite_model(spec, config.offsite_lora_settings(), config.seed)
        if refresh_rank:
            attach_refresh(base_model(emulator), layer_map, refresh_rank)
        models["emulator"] = (emulator, tokenizer)
    return models


def step_seconds(models: dict, examples, args: argparse.Namespace, batch_size: int, max_len: int) -> dict[str, float]:
    """Median seconds per training step of each kind, repeats interleaved so load noise hits both."""
    settings = TrainSettings(steps=args.steps, batch_size=batch_size, max_seq_len=max_len, lr=1e-4)
    for model, tokenizer in models.values():  # warm-up
        train(model, tokenizer, examples, TrainSettings(steps=1, batch_size=batch_size, max_seq_len=max_len, lr=1e-4))
    times: dict[str, list[float]] = {kind: [] for kind in models}
    for _ in range(args.repeats):
        for kind, (model, tokenizer) in models.items():
            times[kind].append(train(model, tokenizer, examples, settings).seconds / args.steps)
    return {kind: statistics.median(values) for kind, values in times.items()}


def peak_memory_mb(kind: str, args: argparse.Namespace, package: Path, train_mode: str, refresh_rank: int = 0) -> float:
    """Peak RSS of a fresh process that loads one kind of client and trains a few steps."""
    command = [sys.executable, __file__, "--measure", kind, "--package", str(package), "--model", args.model, "--train", train_mode, "--refresh-rank", str(refresh_rank),
               "--steps", "2", "--out", args.out, "--adapter-layers", str(args.adapter_layers), "--stride", str(args.stride), "--quantize", args.quantize]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def measure_child(args: argparse.Namespace) -> None:
    config = run_config(args, "measure")
    package = Path(args.package)
    model, tokenizer = client_models(config, package, package.parent / "keys" / "public_key.pem", (args.measure,), args.refresh_rank)[args.measure]
    train(model, tokenizer, run_splits(config)[0], TrainSettings(steps=args.steps, batch_size=config.batch_size, max_seq_len=config.max_seq_len, lr=1e-4))
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM): ru_maxrss would carry the parent's peak across fork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(args: argparse.Namespace, row: str) -> dict:
    if row == "zero-shot":
        return zero_shot_row(args)
    if row in FEDERATED:
        return federated_row(args, row)
    return cost_row(args, row)


REFERENCE_KEYS = {"zero-shot": ("model", "eval_examples"), "full-lora": ("model", "clients", "rounds", "local_steps", "eval_examples")}
LATER_KEYS = {"distill_rank": 0, "align_lr": 1e-3}  # budget keys added after rows were recorded: a row without one was measured at this value
OFFSITE_KEYS = ("model", "clients", "rounds", "local_steps", "adapter_layers", "stride", "quantize", "distill_steps", "distill_objective", "distill_rank", "distill_data", "train", "offsite_lr", "proximal_mu", "align_steps", "align_rank", "align_lr", "eval_examples")


def budget(args: argparse.Namespace, row: str) -> dict:
    """What a row's numbers depend on: a cached row of another budget is not reused. The
    reference rows (no emulator) do not depend on the offsite settings, so one folder's can be
    copied into another's that only changes those."""
    return {key: getattr(args, key) for key in REFERENCE_KEYS.get(row, OFFSITE_KEYS)}


def last_rounds(row: dict, n: int = 3) -> float | None:
    """Mean plug-in eval loss of the last n rounds: the final round's alone moves by up to 0.1
    from round to round, so this is what to rank rows by when they are close."""
    losses = [x for x in (row.get("plug_in_loss_by_round") or [])[1:] if x is not None][-n:]
    return sum(losses) / len(losses) if len(losses) == n else None


def table(rows: dict[str, dict]) -> str:
    """The markdown tables of every finished row."""
    zs, full = rows.get("zero-shot", {}).get("plug_in_loss"), rows.get("full-lora", {}).get("plug_in_loss")
    lines = ["| row | plug-in eval loss | last 3 rounds | exact match | answer-token acc | gain recovered | emulator eval loss | plug-in - emulator | emulator zero-shot loss | refresh MB | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    for name, r in rows.items():
        if name in COSTS:
            continue
        plug, emu = r.get("plug_in_loss"), r.get("emulator_loss")
        gain = (zs - plug) / (zs - full) if None not in (zs, full, plug) and zs != full and name not in ("zero-shot", "full-lora") else None
        gap = plug - emu if None not in (plug, emu) else None
        lines.append(f"| {name} | {f(plug)} | {f(last_rounds(r))} | {f(r.get('plug_in_exact_match'))} | {f(r.get('plug_in_token_accuracy'))} | {f(gain, 2)} | {f(emu)} | {f(gap)} | {f(r.get('emulator_zero_shot_loss'))} | {f((r.get('refresh_bytes') or 0) / 1e6, 2)} | {f(r.get('wall_seconds'), 0)} |")
    costs = [(n, r) for n, r in rows.items() if n in COSTS]
    if costs:
        lines += ["", "| cost | emulator / backbone bytes | step s full | step s emulator | emulator / full step | peak RSS MB full | peak RSS MB emulator |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, r in costs:
            lines.append(f"| {name} | {r['byte_ratio']:.3f} | {r['step_seconds_full']:.3f} | {r['step_seconds_emulator']:.3f} | {r['step_ratio']:.2f} | {r['peak_rss_mb_full']:.0f} | {r['peak_rss_mb_emulator']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse()
    if args.measure:
        measure_child(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        sys.exit(f"error: unknown row '{unknown[0]}' (rows: {', '.join(ROWS)})")
    folder = Path(args.out) / "rows"
    folder.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    for row in wanted:
        path = folder / f"{row}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            wanted = budget(args, row)
            if {key: (cached.get("budget") or {}).get(key, LATER_KEYS.get(key)) for key in wanted} == wanted:
                print(f"row {row}: done before ({cached.get('wall_seconds', 0):.0f} s then), skipped")
                done[row] = cached
                continue
            sys.exit(f"error: {path} was measured at another budget; move it away or use another --out")
        started = time.perf_counter()
        result = {**run_row(args, row), "budget": budget(args, row)}
        result["wall_seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(result, indent=2))
        print(f"row {row}: {result['wall_seconds']:.0f} s")
        done[row] = result
    print()
    print(f"model {args.model}; {args.clients} clients x {args.rounds} rounds x {args.local_steps} steps; emulator k={args.adapter_layers}, stride {args.stride}, middle {args.quantize}, "
          f"distill {args.distill_steps} steps ({args.distill_objective}), clients train {args.train}; +prox rows lambda {args.proximal_mu:g}")
    print(table(done))


if __name__ == "__main__":
    main()
