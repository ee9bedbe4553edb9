"""The results folder a run leaves behind: files a machine or a person can open.

    config.toml       the exact configuration (reusable with `fedsite simulate --config`)
    metrics.jsonl     one object per round: central eval, train loss, participation, bytes, times;
                      the first line is the round-0 baseline (central eval only: no training keys)
    clients.jsonl     one object per client update: examples, loss, bytes, accepted or why not;
                      also rejected evaluate replies and refused query answers ("phase")
    privacy.jsonl     the privacy ledger: per client per round (local DP, epsilon recomputed by
                      the coordinator beside the client's own) or per round (client DP)
    summary.json      initial and final evaluation, per task
    summary.md        the same for people, with a per-round table (train, evaluation, total seconds)
    curves.png        accuracy and loss per round
    adapter/          the final adapter in PEFT format, with its model card (coordinator/model_card.py)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tomli_w

from coordinator.energy import energy_markdown, run_energy
from finetune.config import FedsiteConfig


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunRecorder:
    """Collects what happens in each round and appends it to the results folder."""

    def __init__(self, out: str | Path, config: FedsiteConfig, fresh: bool = True) -> None:
        """`fresh=False` keeps the files a resumed run continues (see coordinator/checkpoint.py)."""
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.rounds: list[dict[str, Any]] = []
        self.initial: dict[str, Any] | None = None
        self._pending: dict[str, Any] = {}
        for name in ("metrics.jsonl", "clients.jsonl", "privacy.jsonl"):
            if fresh or not (self.out / name).exists():
                (self.out / name).write_text("")
        write_atomic(self.out / "config.toml", tomli_w.dumps(config.to_flat()))

    def record(self, **values: Any) -> None:
        """Add fields to the round in progress (train stats, federated eval, ...)."""
        self._pending.update(values)

    def record_client(self, entry: dict[str, Any]) -> None:
        with (self.out / "clients.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def record_privacy(self, entry: dict[str, Any]) -> None:
        """One ledger line: mechanism, noise, sampling, steps, delta, epsilon (enough to recompute it;
        local DP: see coordinator/ledger.py)."""
        with (self.out / "privacy.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def finish_round(self, server_round: int, central: dict[str, Any]) -> dict[str, Any]:
        """Close round `server_round` with its central evaluation and append its row to metrics.jsonl.

        Round 0 is the baseline: its row (the first line, central evaluation only) is kept as
        `initial`, not in `rounds`; a resumed run never evaluates round 0 again.
        """
        if server_round == 0:
            self.initial = central
            self._pending = {}
            row = {"round": 0, **central}
        else:
            row = round_times({"round": server_round, **central, **self._pending})
            self._pending = {}
            self.rounds.append(row)
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def write_summary(self, **extra: Any) -> None:
        """summary.json/md and curves.png; `extra` adds sections to summary.json (e.g. offsite)."""
        final = self.rounds[-1] if self.rounds else {}
        energy = run_energy(self.rounds)
        summary = {"initial": self.initial, "final": final, "rounds": len(self.rounds), **({"energy": energy} if energy else {}), **extra}
        write_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
        markdown = summary_markdown(self.config, self.initial, self.rounds) + "\n".join(energy_markdown(self.rounds))
        write_atomic(self.out / "summary.md", markdown + ("\n" if energy else ""))
        if self.rounds:
            plot_curves(self.rounds, self.initial, self.out / "curves.png", run_title(self.config))


TINY_NOTE = (
    "Plumbing check: model `tiny` is a randomly initialised 4-layer Llama with a character tokenizer, built "
    "in-process (no download). It shows that every part of the pipeline runs, not that anything is learned: "
    "exact-match accuracy stays 0.000, as expected; the loss falls."
)
ACCURACY_LABEL = "exact match (fraction of held-out examples)"
LOSS_LABEL = "loss (nats per answer token)"


def round_times(row: dict[str, Any]) -> dict[str, Any]:
    """Add `total_seconds` (round start to the end of its central evaluation) to a round's row.

    `train_seconds` (sending, client training, aggregation) and `federated_eval_seconds` come from
    the strategy, `round_seconds` (round start to central evaluation) and `eval_seconds` (the
    central evaluation) from coordinator/server_app.py.
    """
    if isinstance(row.get("round_seconds"), (int, float)) and isinstance(row.get("eval_seconds"), (int, float)):
        row["total_seconds"] = row["round_seconds"] + row["eval_seconds"]
    return row


def evaluation_seconds(row: dict[str, Any]) -> float | None:
    """Central plus federated evaluation time of a round (None when the row has neither)."""
    parts = [row[k] for k in ("eval_seconds", "federated_eval_seconds") if isinstance(row.get(k), (int, float))]
    return sum(parts) if parts else None


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("–" if value is None else str(value))


def results_table(initial: dict[str, Any] | None, rounds: list[dict[str, Any]]) -> list[str]:
    """The per-round markdown table of summary.md and the model card (round 0 = baseline)."""
    lines = [
        "| round | eval accuracy | eval loss | train loss | contributors | rejected | upload MB | train s | eval s | total s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if initial:
        eval_s = _fmt(initial.get("eval_seconds"), 1)
        lines.append(f"| 0 (baseline) | {_fmt(initial.get('eval_accuracy'))} | {_fmt(initial.get('eval_loss'))} | – | – | – | – | – | {eval_s} | {eval_s} |")
    for row in rounds:
        mb = row.get("upload_bytes", 0) / 1e6
        lines.append(
            f"| {row['round']} | {_fmt(row.get('eval_accuracy'))} | {_fmt(row.get('eval_loss'))} | {_fmt(row.get('train_loss'))} "
            f"| {len(row.get('contributors', []))} | {len(row.get('rejected', []))} | {mb:.2f} "
            f"| {_fmt(row.get('train_seconds'), 1)} | {_fmt(evaluation_seconds(row), 1)} | {_fmt(row.get('total_seconds'), 1)} |"
        )
    return lines


def summary_markdown(config: FedsiteConfig, initial: dict[str, Any] | None, rounds: list[dict[str, Any]]) -> str:
    lines = [
        "# Fedsite run",
        "",
        f"model `{config.model}`, data `{config.data}` ({config.partitioning}), {config.clients} clients, "
        f"{config.num_server_rounds} rounds, {config.local_steps} local steps, LoRA r={config.lora_rank} on {config.lora_targets}",
        "",
    ]
    if config.model == "tiny":
        lines += [f"> {TINY_NOTE}", ""]
    lines += results_table(initial, rounds)
    lines += [
        "",
        "train s: from sending the round to the aggregate (client training, transfers, aggregation); "
        "eval s: central evaluation on the coordinator plus federated evaluation on clients; total s: the whole round.",
    ]
    if rounds and rounds[-1].get("eval_per_task"):
        lines += ["", "## Final accuracy per task", "", "| task | initial | final |", "|---|---:|---:|"]
        start = (initial or {}).get("eval_per_task", {})
        for task, acc in rounds[-1]["eval_per_task"].items():
            lines.append(f"| {task} | {_fmt(start.get(task))} | {_fmt(acc)} |")
    return "\n".join(lines) + "\n"


def curves_figure(rounds: list[dict[str, Any]], initial: dict[str, Any] | None, title: str = ""):
    """The figure of curves.png: held-out accuracy and loss per round, integer round ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    points = ([{"round": 0, **initial}] if initial else []) + rounds
    xs = [p["round"] for p in points]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    acc_ax.plot(xs, [p.get("eval_accuracy") for p in points], marker="o")
    acc_ax.set(title="held-out exact match", xlabel="round (0 = before training)", ylabel=ACCURACY_LABEL, ylim=(-0.02, 1.02))
    loss_ax.plot(xs, [p.get("eval_loss") for p in points], marker="o", label="eval (held-out)")
    train = [(p["round"], p["train_loss"]) for p in points if p.get("train_loss") is not None]
    if train:
        loss_ax.plot(*zip(*train), marker="s", label="train (clients, mean)")
    loss_ax.set(title="loss", xlabel="round (0 = before training)", ylabel=LOSS_LABEL)
    loss_ax.legend()
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(rounds: list[dict[str, Any]], initial: dict[str, Any] | None, path: Path, title: str = "") -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(rounds, initial, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_title(config: FedsiteConfig) -> str:
    """One line naming the run for plots: model, rule, clients, rounds."""
    note = " (plumbing check: random weights)" if config.model == "tiny" else ""
    return f"Fedsite: {config.model}{note}, {config.aggregation}, {config.clients} clients, {config.num_server_rounds} rounds"
