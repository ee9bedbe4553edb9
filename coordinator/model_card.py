"""The model card of an exported adapter (`adapter/README.md`, in place of PEFT's empty template).

It says what someone who receives the folder needs: the base model's portable id (also
`base_model_name_or_path` in adapter_config.json) and the local copy this run used
(`fedsite_backbone.json`), the data, the method (aggregation, LoRA, quantization, offsite), the
federation (rounds, clients), the privacy spent (epsilon at delta, from the privacy ledger) and
the per-round results table of summary.md. Everything comes from the run's config and recorded
rows; nothing is measured here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from coordinator.results import TINY_NOTE, results_table, write_atomic
from finetune.config import FedsiteConfig
from finetune.tasks import TASK_FAMILIES

OFFSITE_KEYS = {"offsite_eval_accuracy": "eval_accuracy", "offsite_eval_loss": "eval_loss"}


def data_description(config: FedsiteConfig) -> str:
    if config.data == "builtin":
        families = ", ".join(TASK_FAMILIES)
        return (f"the built-in suite of generated instruction tasks with exact-match answers ({families}): "
                f"{config.train_per_task} training and {config.test_per_task} held-out examples per task, seed {config.seed}")
    return f"`{config.data}` (instruction / input / output examples; it stays with the run's owner)"


def method_lines(config: FedsiteConfig) -> list[str]:
    rule = config.aggregation
    if rule in ("fedadam", "fedyogi", "fedavgm"):
        rule += f" (server lr {config.server_lr:g})"
    elif rule == "fedprox":
        rule += f" (mu {config.proximal_mu:g})"
    lines = [
        f"- aggregation: {rule}{', secure aggregation (SecAgg+)' if config.secure else ''}",
        f"- LoRA: rank {config.lora_rank}, alpha {config.lora_alpha}, dropout {config.lora_dropout:g}, on `{config.lora_targets}`",
        f"- local training: {f'{config.local_epochs} epochs' if config.local_epochs else f'{config.local_steps} steps'} per round, "
        f"batch {config.batch_size}, lr {config.lr:g}",
        f"- client backbone quantization: {'none (fp32)' if config.quantize == 'none' else config.quantize + ' (bitsandbytes, QLoRA-style)'}",
        f"- upload codec: {config.upload_codec}" + (f", top-{config.upload_topk:g} sparsified" if config.upload_topk else ""),
    ]
    if config.emulator_share > 0 or config.experiment:
        lines.append(f"- offsite: {config.emulator_share:g} of the clients train against an emulator ("
                     f"{f'keep {config.emulator_keep:g}' if config.emulator_keep else f'stride {config.emulator_stride}'}, {config.emulator_fill} fill, "
                     f"{config.emulator_quantize} middle, offsite-train {config.offsite_train}); their plug-in adapter is `offsite_adapter/`")
    else:
        lines.append("- offsite: off (every client holds the backbone)")
    return lines


def read_ledger(out: Path) -> list[dict[str, Any]]:
    """privacy.jsonl's rows; a line that is not a JSON object is skipped."""
    path = out / "privacy.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def spent_epsilon(ledger: list[dict[str, Any]]) -> float | None:
    """The run's epsilon: the largest any client's cumulative epsilon reached (local DP; under client
    DP every entry is the coordinator's user-level epsilon, which only grows)."""
    values = [float(r["epsilon"]) for r in ledger if isinstance(r.get("epsilon"), (int, float)) and math.isfinite(r["epsilon"])]
    return max(values) if values else None


def privacy_lines(config: FedsiteConfig, ledger: list[dict[str, Any]]) -> list[str]:
    if config.dp == "none":
        return ["- no differential privacy (clients' data never leaves them, but updates are not noised)"]
    eps = spent_epsilon(ledger)
    spent = f"epsilon {eps:.3f} at delta {config.delta:g}" if eps is not None else f"no epsilon recorded (delta {config.delta:g})"
    if config.dp == "local":
        lines = [f"- local DP-SGD on every client (Opacus): noise multiplier {config.noise_multiplier:g}"
                 + (f" (calibrated to target epsilon {config.target_epsilon:g})" if config.target_epsilon else "")
                 + f", per-sample clipping {config.dp_max_grad_norm:g}",
                 f"- spent: {spent} (the largest client's, recomputed by the coordinator from the ledger)"]
        if config.epsilon_budget:
            lines.append(f"- budget per client: epsilon {config.epsilon_budget:g}")
        return lines
    return [f"- user-level DP at the coordinator (DP-FedAvg): noise multiplier {config.noise_multiplier:g}, clip {config.dp_clip_norm:g}"
            + (" (adaptive)" if config.dp_adaptive_clip else ""),
            f"- spent: {spent} (user-level)"]


def model_card(config: FedsiteConfig, backbone: dict[str, str], initial: dict[str, Any] | None, rounds: list[dict[str, Any]],
               ledger: list[dict[str, Any]], offsite: bool = False) -> str:
    """The card's markdown. `offsite`: the card of `offsite_adapter/`, whose results are the plug-in's."""
    base = backbone["base_model_name_or_path"]
    name = "offsite_adapter" if offsite else "adapter"
    if offsite:
        initial = {v: (initial or {}).get(k) for k, v in OFFSITE_KEYS.items()} if initial else None
        rounds = [{**r, **{v: r.get(k) for k, v in OFFSITE_KEYS.items()}} for r in rounds]
    tags = ["lora", "peft", "federated-learning", "flower", "fedsite"] + (["differential-privacy"] if config.dp != "none" else [])
    contributors = [len(r.get("contributors", [])) for r in rounds]
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "pipeline_tag: text-generation",
        "tags:",
        *(f"- {t}" for t in tags),
        "---",
        "",
        f"# {'Offsite plug-in' if offsite else 'LoRA'} adapter for {base}, fine-tuned federatedly with Fedsite",
        "",
    ]
    if config.model == "tiny":
        lines += [f"> {TINY_NOTE}", ""]
    lines += [
        "## Base model",
        "",
        f"- id: `{base}` (`base_model_name_or_path` in adapter_config.json)",
        f"- local copy this run used: `{backbone['local_path']}` (Fedsite `--model {backbone['model']}`; recorded in fedsite_backbone.json)",
        "",
        "## Data",
        "",
        f"- {data_description(config)}",
        f"- partitioned {config.partitioning} over the clients; held-out evaluation on {config.eval_examples} examples at the coordinator",
        "",
        "## Method",
        "",
        *method_lines(config),
        "",
        "## Federation",
        "",
        f"- rounds: {len(rounds)} of {config.num_server_rounds} planned",
        f"- clients: {config.clients} ({config.fraction_train:.0%} sampled per round, at least {config.min_train_clients}); "
        f"contributors per round: {', '.join(map(str, contributors)) or 'none'}",
        "",
        "## Privacy",
        "",
        *privacy_lines(config, ledger),
        "",
        "## Results",
        "",
        ("Plug-in scores: the full backbone with this adapter. " if offsite else "")
        + "Held-out exact match and loss per round (round 0: before training).",
        "",
        *results_table(initial, rounds),
        "",
        "## Use",
        "",
        "```python",
        "from finetune.lora import load_adapter          # Fedsite: the backbone from the local copy above",
        f"model, tokenizer = load_adapter(\"{name}\")",
        "",
        *(["from peft import PeftModel                      # the tiny Llama is rebuilt from its seed, never downloaded",
           "from finetune.backbone import build_tiny_llama",
           f"model = PeftModel.from_pretrained(build_tiny_llama(), \"{name}\")"] if base == "tiny" else
          ["from peft import PeftModel                      # elsewhere: any copy of the base model",
           "from transformers import AutoModelForCausalLM",
           f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base}\"), \"{name}\")"]),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, config: FedsiteConfig, initial: dict[str, Any] | None, rounds: list[dict[str, Any]], offsite: bool = False) -> Path:
    """Write `folder/README.md` from the run's rows and the backbone note export_adapter left there."""
    backbone = json.loads((folder / "fedsite_backbone.json").read_text())
    path = folder / "README.md"
    write_atomic(path, model_card(config, backbone, initial, rounds, read_ledger(Path(config.out)), offsite))
    return path
