"""The results folder a run leaves behind: files a machine or a person can open.

    config.toml       the exact configuration (reusable with `fedsite simulate --config`)
    metrics.jsonl     one object per round: central eval, train loss, participation, bytes
    clients.jsonl     one object per client update: examples, loss, bytes, accepted or why not;
                      also rejected evaluate replies and refused query answers ("phase")
    privacy.jsonl     the privacy ledger: per client per round (local DP, epsilon recomputed by
                      the coordinator beside the client's own) or per round (client DP)
    summary.json      initial and final evaluation, per task
    summary.md        the same for people, with a per-round table
    curves.png        accuracy and loss per round
    adapter/          the final adapter in PEFT format
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
        """Close round `server_round` with its central evaluation; round 0 is the baseline."""
        if server_round == 0:
            self.initial = central
            self._pending = {}
            return central
        row = {"round": server_round, **central, **self._pending}
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
            plot_curves(self.rounds, self.initial, self.out / "curves.png")


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("–" if value is None else str(value))


def summary_markdown(config: FedsiteConfig, initial: dict[str, Any] | None, rounds: list[dict[str, Any]]) -> str:
    lines = [
        "# Fedsite run",
        "",
        f"model `{config.model}`, data `{config.data}` ({config.partitioning}), {config.clients} clients, "
        f"{config.num_server_rounds} rounds, {config.local_steps} local steps, LoRA r={config.lora_rank} on {config.lora_targets}",
        "",
        "| round | eval accuracy | eval loss | train loss | contributors | rejected | upload MB | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if initial:
        lines.append(f"| 0 | {_fmt(initial.get('eval_accuracy'))} | {_fmt(initial.get('eval_loss'))} | – | – | – | – | – |")
    for row in rounds:
        mb = row.get("upload_bytes", 0) / 1e6
        lines.append(
            f"| {row['round']} | {_fmt(row.get('eval_accuracy'))} | {_fmt(row.get('eval_loss'))} | {_fmt(row.get('train_loss'))} "
            f"| {len(row.get('contributors', []))} | {len(row.get('rejected', []))} | {mb:.2f} | {_fmt(row.get('round_seconds'), 1)} |"
        )
    if rounds and rounds[-1].get("eval_per_task"):
        lines += ["", "## Final accuracy per task", "", "| task | initial | final |", "|---|---:|---:|"]
        start = (initial or {}).get("eval_per_task", {})
        for task, acc in rounds[-1]["eval_per_task"].items():
            lines.append(f"| {task} | {_fmt(start.get(task))} | {_fmt(acc)} |")
    return "\n".join(lines) + "\n"


def plot_curves(rounds: list[dict[str, Any]], initial: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = ([{"round": 0, **initial}] if initial else []) + rounds
    xs = [p["round"] for p in points]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    acc_ax.plot(xs, [p.get("eval_accuracy") for p in points], marker="o")
    acc_ax.set(title="held-out exact match", xlabel="round", ylabel="accuracy", ylim=(0, 1))
    loss_ax.plot(xs, [p.get("eval_loss") for p in points], marker="o", label="eval")
    train = [(p["round"], p["train_loss"]) for p in points if p.get("train_loss") is not None]
    if train:
        loss_ax.plot(*zip(*train), marker="s", label="train (clients)")
    loss_ax.set(title="loss", xlabel="round")
    loss_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
