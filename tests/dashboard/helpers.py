"""Results folders written by hand, shaped like coordinator/results.py writes them (fast: no run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomli_w


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def round_row(r: int, clients: int, *, loss: float, offsite: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {
        "round": r, "eval_loss": loss, "eval_accuracy": min(1.0, 0.1 * r), "eval_per_task": {"sort": 0.1 * r}, "eval_seconds": 1.5,
        "round_seconds": 2.0, "sampled": clients, "aggregation": "fedavg", "contributors": list(range(clients - 1)),
        "rejected": [{"client": clients - 1, "reason": "update norm 9.1 > max-update-norm 1"}], "train_loss": loss + 0.1,
        "train_examples": 300 * clients, "upload_bytes": 28804 * clients, "aggregation_seconds": 0.01,
    }  # fmt: skip
    if offsite:
        row.update(offsite_eval_loss=loss - 0.05, offsite_eval_accuracy=0.05 * r, contributors_by_kind={"lora": [0], "emulator": [1, 2]})
    return row


def client_rows(r: int, clients: int, dp: bool = False) -> list[dict[str, Any]]:
    rows = []
    for c in range(clients):
        row: dict[str, Any] = {
            "round": r, "node_id": 10303185501554209682 + c, "num_examples": 300 + c, "train_loss": 4.0 - 0.1 * r + 0.01 * c,
            "train_loss_final": 3.9, "steps": 10, "train_seconds": 0.5 + 0.1 * c, "upload_bytes": 28804, "client_id": c,
            "profile": "phone" if c % 2 else "laptop", "package_kind": "lora", "lora_rank": 8, "quantize": "none", "upload_codec": "fp32",
        }  # fmt: skip
        if dp:
            row["dp_epsilon"] = 0.5 * r + 0.1 * c
        if c == clients - 1:
            row.update(status="rejected", reason="update norm 9.1 > max-update-norm 1")
        else:
            row["status"] = "accepted"
        rows.append(row)
    return rows


def privacy_rows(r: int, clients: int) -> list[dict[str, Any]]:
    return [{"round": r, "client": c, "mechanism": "local-dp-sgd", "accountant": "rdp", "noise_multiplier": 1.0, "sample_rate": 0.03,
             "steps": 10, "total_steps": 10 * r, "delta": 1e-5, "epsilon": 0.5 * r + 0.1 * c} for c in range(clients)]  # fmt: skip


def make_run(folder: Path, rounds: int = 3, clients: int = 4, *, total: int | None = None, dp: bool = False, offsite: bool = False,
             finished: bool = True, loss0: float = 4.5) -> Path:  # fmt: skip
    """A results folder with `rounds` rounds of `total` (default: all, finished)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model": "tiny", "clients": clients, "num-server-rounds": total or rounds, "aggregation": "fedavg", "dp": "local" if dp else "none",
              "epsilon-budget": 2.0 if dp else 0.0, "out": str(folder)}  # fmt: skip
    (folder / "config.toml").write_text(tomli_w.dumps(config))
    write_jsonl(folder / "metrics.jsonl", [round_row(r, clients, loss=loss0 - 0.2 * r, offsite=offsite) for r in range(1, rounds + 1)])
    write_jsonl(folder / "clients.jsonl", [row for r in range(1, rounds + 1) for row in client_rows(r, clients, dp)])
    write_jsonl(folder / "privacy.jsonl", [row for r in range(1, rounds + 1) for row in privacy_rows(r, clients)] if dp else [])
    if finished:
        summary: dict[str, Any] = {"initial": {"eval_loss": loss0, "eval_accuracy": 0.0}, "final": {"round": rounds}, "rounds": rounds}
        if offsite:
            summary["initial"].update(offsite_eval_loss=loss0, offsite_eval_accuracy=0.0, emulator_eval_loss=loss0 + 0.1, emulator_eval_accuracy=0.0)
            summary["offsite"] = {"ratio": 0.4, "emulator_bytes": 1000, "backbone_bytes": 2500, "signing_key": "/secret/path/signing_key.pem"}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder
