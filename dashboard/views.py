"""The JSON each page shows, computed from a run's rows (see coordinator/results.py for the fields).

Every field but `round` is optional and any of them may be missing, of the wrong type or
absent from older runs: numbers are taken only when they are numbers, lists are counted only
when they are lists, and a page with nothing to show says so instead of failing.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from statistics import median
from typing import Any

from dashboard.runs import Run

PAGE_LIMIT = 500  # client rows per request at most
CLIENT_COLUMNS = (
    "round", "client", "status", "reason", "examples", "train_loss", "train_loss_final", "steps", "seconds", "upload_bytes",
    "profile", "package_kind", "lora_rank", "quantize", "upload_codec", "simulated_seconds", "epsilon", "node_id",
)  # fmt: skip
TEXT_COLUMNS = frozenset({"status", "reason", "profile", "package_kind", "quantize", "upload_codec", "client", "node_id"})
HIGHLIGHTS = (
    "model", "clients", "num-server-rounds", "fraction-train", "aggregation", "partitioning", "local-steps", "lora-rank",
    "upload-codec", "dp", "noise-multiplier", "epsilon-budget", "target-epsilon", "secure", "quantize", "emulator-share",
)  # fmt: skip
LATEST = ("eval_accuracy", "eval_loss", "train_loss", "upload_bytes", "download_bytes", "round_seconds", "simulated_seconds",
          "federated_eval_accuracy", "offsite_eval_accuracy")  # fmt: skip
PARTICIPATION = ("sampled", "contributors", "rejected", "dropped", "stragglers", "unavailable")
PRIVACY_TRACES = 40  # clients drawn one line each; beyond, the spread over clients per round
OFFSITE_PACKAGE = ("backbone_id", "layer_map", "dropped", "quantization", "distilled", "emulator_bytes", "backbone_bytes",
                   "package_bytes", "ratio", "emulator_params", "adapter_params", "backbone_params", "key_id")  # fmt: skip


def num(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


def count(value: Any) -> int | None:
    """Participation fields are lists of ids (or a plain count in older runs)."""
    if isinstance(value, (list, tuple, dict)):
        return len(value)
    n = num(value)
    return int(n) if n is not None else None


def text(value: Any, limit: int = 300) -> str | None:
    return None if value is None else str(value)[:limit]


def total_rounds(run: Run, rounds: list[dict[str, Any]]) -> int | None:
    planned = num(run.config().get("num-server-rounds"))
    return int(planned) if planned else (len(rounds) or None)


def status_of(run: Run, rounds: list[dict[str, Any]]) -> str:
    """'finished' once summary.json is written (last, coordinator/results.py); before, 'in progress'
    (a killed run stays so: the overview's last update tells how long ago it wrote)."""
    if run.summary() is not None:
        return "finished"
    return "in progress" if rounds else "starting"


def round_row(row: dict[str, Any]) -> dict[str, Any]:
    """One line of the per-round table: numbers, counts of the id lists, rejection reasons."""
    out: dict[str, Any] = {"round": row["round"]}
    for key in ("eval_accuracy", "eval_loss", "train_loss", "federated_eval_accuracy", "offsite_eval_accuracy", "upload_bytes",
                "download_bytes", "round_seconds", "eval_seconds", "simulated_seconds", "train_examples"):  # fmt: skip
        out[key] = num(row.get(key))
    for key in PARTICIPATION:
        out[key] = count(row.get(key))
    rejected = row.get("rejected") if isinstance(row.get("rejected"), list) else []
    out["rejections"] = [{"client": text(r.get("client"), 40), "reason": text(r.get("reason"))} for r in rejected[:50] if isinstance(r, dict)]
    out["dropped_ids"] = [text(x, 40) for x in row.get("dropped", [])[:50]] if isinstance(row.get("dropped"), list) else []
    out["stragglers_ids"] = [text(x, 40) for x in row.get("stragglers", [])[:50]] if isinstance(row.get("stragglers"), list) else []
    out["aggregation"] = text(row.get("aggregation"), 40)
    out["secure_halted"] = text(row.get("secure_halted"))
    eps = row.get("privacy", {}).get("epsilon") if isinstance(row.get("privacy"), dict) else None
    out["epsilon"] = num(eps)
    return out


def initial_of(run: Run, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The baseline evaluation: summary.json's (a finished run), else metrics.jsonl's round-0 row (live)."""
    if isinstance(summary.get("initial"), dict):
        return summary["initial"]
    baseline = run.baseline()
    return {k: v for k, v in baseline.items() if k != "round"} if baseline else None


def scalars(row: dict[str, Any] | None) -> dict[str, float]:
    return {k: v for k, v in ((k, num(v)) for k, v in (row or {}).items()) if v is not None}


def overview(run: Run, now: float | None = None) -> dict[str, Any]:
    """Where the run is: round k of R, elapsed, ETA, latest metrics, the main settings."""
    now = time.time() if now is None else now
    rounds = run.rounds()
    total = total_rounds(run, rounds)
    summary = run.summary() or {}
    config = run.config()
    stamps = run.stamps()
    started = stamps["config.toml"][1] / 1e9 if stamps.get("config.toml") else None
    changed = [s[1] / 1e9 for s in stamps.values() if s]
    last_update = max(changed) if changed else None
    status = status_of(run, rounds)
    end = stamps["summary.json"][1] / 1e9 if status == "finished" and stamps.get("summary.json") else now
    per_round = [(num(r.get("round_seconds")) or 0.0) + (num(r.get("eval_seconds")) or 0.0) for r in rounds[-5:]]
    eta = None
    if status != "finished" and total and per_round and len(rounds) < total:
        since_last = max(0.0, now - (last_update or now))
        eta = max(0.0, (total - len(rounds)) * sum(per_round) / len(per_round) - since_last)
    last = rounds[-1] if rounds else None
    initial = initial_of(run, summary)
    return {
        "id": run.id,
        "name": run.name,
        "status": status,
        "round": last["round"] if last else 0,
        "rounds_recorded": len(rounds),
        "total_rounds": total,
        "elapsed_seconds": max(0.0, end - started) if started else None,
        "eta_seconds": eta,
        "last_update_seconds": max(0.0, now - last_update) if last_update else None,
        "latest": {k: num(last.get(k)) for k in LATEST if last and num(last.get(k)) is not None} | (
            {k: count(last.get(k)) for k in PARTICIPATION if count(last.get(k)) is not None} if last else {}),
        "initial": scalars(initial),
        "final": scalars(summary.get("final") if isinstance(summary.get("final"), dict) else None),
        "settings": {k: config[k] for k in HIGHLIGHTS if k in config},
        "client_rows": len(run.clients()),
        "privacy_rows": len(run.privacy()),
        "skipped_lines": run.skipped_lines(),
    }


def run_listing(run: Run) -> dict[str, Any]:
    """What `GET /api/runs` lists per run: its rounds from metrics.jsonl and enough to draw the curves."""
    rounds = run.rounds()
    total = total_rounds(run, rounds)
    summary = run.summary() or {}
    initial = initial_of(run, summary)
    return {
        "id": run.id,
        "name": run.name,
        "status": status_of(run, rounds),
        "total_rounds": total,
        "version": run.version(),
        "initial": scalars(initial) or None,
        "rounds": [round_row(r) for r in rounds],
    }


def client_row(row: dict[str, Any]) -> dict[str, Any]:
    name = row.get("client_id")
    if name is None or (isinstance(name, int) and name < 0):  # -1: not a simulated partition
        name = row.get("client", row.get("node_id"))
    return {
        "round": row.get("round") if isinstance(row.get("round"), int) and not isinstance(row.get("round"), bool) else None,
        "client": text(name, 40),
        "status": text(row.get("status"), 20),
        "reason": text(row.get("reason")),
        "examples": num(row.get("num_examples")),
        "train_loss": num(row.get("train_loss")),
        "train_loss_final": num(row.get("train_loss_final")),
        "steps": num(row.get("steps")),
        "seconds": num(row.get("train_seconds")),
        "upload_bytes": num(row.get("upload_bytes")),
        "profile": text(row.get("profile"), 60),
        "package_kind": text(row.get("package_kind"), 20),
        "lora_rank": num(row.get("lora_rank")),
        "quantize": text(row.get("quantize"), 20),
        "upload_codec": text(row.get("upload_codec"), 20),
        "simulated_seconds": num(row.get("simulated_seconds")),
        "epsilon": num(row.get("dp_epsilon")),
        "node_id": text(row.get("node_id"), 40),
    }


def _sort_key(column: str):
    if column in TEXT_COLUMNS:
        return lambda r: (r[column] is None, _natural(r[column]))
    return lambda r: (r[column] is None, r[column] if r[column] is not None else 0.0)


def _natural(value: str | None) -> tuple:
    """'10' after '9': numeric strings compare as numbers."""
    if value is None:
        return (0, 0.0, "")
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value.lower())


def clients_page(run: Run, round_filter: int | None, status: str | None, sort: str, descending: bool, offset: int, limit: int) -> dict[str, Any]:
    """One page of the per-client table, filtered and sorted over all rows (sorting happens here,
    so a browser never holds 10,000 rows to sort them)."""
    table = run.client_table(client_row)
    rounds = sorted({r["round"] for r in table if r["round"] is not None})
    rows = table if round_filter is None else [r for r in table if r["round"] == round_filter]
    statuses = Counter(r["status"] or "unknown" for r in rows)
    reasons = Counter((r["reason"] or "")[:80] for r in rows if r["status"] != "accepted" and r["reason"])
    if status:
        rows = [r for r in rows if r["status"] == status]
    if sort in CLIENT_COLUMNS:
        none_last = [r for r in rows if r[sort] is not None]
        rows = sorted(none_last, key=_sort_key(sort), reverse=descending) + [r for r in rows if r[sort] is None]
    limit = max(1, min(limit, PAGE_LIMIT))
    offset = max(0, offset)
    return {
        "columns": list(CLIENT_COLUMNS),
        "rounds": rounds,
        "total": len(table),
        "matching": len(rows),
        "offset": offset,
        "rows": rows[offset : offset + limit],
        "statuses": dict(statuses),
        "reasons": dict(reasons.most_common(10)),
        "skipped_lines": run.clients_file.skipped,
    }


def _budget(config: dict[str, Any]) -> float | None:
    for key in ("epsilon-budget", "target-epsilon"):
        value = num(config.get(key))
        if value and value > 0:
            return value
    return None


def privacy(run: Run) -> dict[str, Any]:
    """Epsilon per client over rounds (each client's accountant is cumulative) against the budget,
    and the run-level epsilon: the largest any client has spent (local DP), or the user-level
    epsilon of the coordinator's mechanism (client DP)."""
    ledger = run.privacy()
    config = run.config()
    series: dict[str, list[tuple[int, float]]] = {}
    mechanisms: Counter[str] = Counter()
    for row in ledger:
        eps, rnd = num(row.get("epsilon")), row.get("round")
        if eps is None or not isinstance(rnd, int):
            continue
        mechanisms[text(row.get("mechanism"), 40) or "unknown"] += 1
        series.setdefault(text(row.get("client"), 40) or "?", []).append((rnd, eps))
    latest = {c: max(points)[1] for c, points in series.items()}  # each client's epsilon at its latest round
    by_round: dict[int, list[float]] = {}
    for points in series.values():  # the clients that trained in each round
        for rnd, eps in points:
            by_round.setdefault(rnd, []).append(eps)
    spread = [{"round": r, "max": max(v), "median": median(v), "min": min(v), "clients": len(v)} for r, v in sorted(by_round.items())]
    worst, run_series = 0.0, []
    for r, values in sorted(by_round.items()):  # the largest epsilon any client has spent by round r
        worst = max(worst, *values)
        run_series.append([r, worst])
    shown = sorted(latest, key=lambda c: -latest[c])[:PRIVACY_TRACES]
    budget = _budget(config)
    client_dp = mechanisms.get("client-dp", 0) > 0
    run_eps = max(latest.values()) if latest else None
    if client_dp:
        run_eps = max((eps for points in series.values() for _, eps in points), default=None)
    return {
        "present": bool(series),
        "mode": text(config.get("dp"), 20),
        "mechanisms": dict(mechanisms),
        "delta": num(next((r.get("delta") for r in reversed(ledger) if num(r.get("delta")) is not None), None)),
        "budget": budget,
        "run_epsilon": run_eps,
        "run_epsilon_basis": "user-level (coordinator)" if client_dp else "largest client",
        "clients": len(series),
        "over_budget": sorted(c for c, e in latest.items() if budget is not None and e >= budget),
        "traces": {c: [list(p) for p in sorted(series[c])] for c in shown},
        "spread": spread,
        "run_series": run_series,
        "latest": [{"client": c, "epsilon": latest[c], "rounds": len(series[c])} for c in sorted(latest, key=lambda c: -latest[c])[:PAGE_LIMIT]],
        "entries": len(ledger),
        "skipped_lines": run.privacy_file.skipped,
    }


def offsite(run: Run) -> dict[str, Any]:
    """The offsite track: the plug-in's and the emulator's scores beside the LoRA track's."""
    rounds = run.rounds()
    summary = run.summary() or {}
    keys = ("eval_accuracy", "eval_loss", "offsite_eval_accuracy", "offsite_eval_loss", "emulator_eval_accuracy", "emulator_eval_loss")
    rows = []
    for r in rounds:
        kinds = r.get("contributors_by_kind") if isinstance(r.get("contributors_by_kind"), dict) else {}
        row = {"round": r["round"], **{k: num(r.get(k)) for k in keys}}
        row["lora_clients"], row["emulator_clients"] = count(kinds.get("lora")), count(kinds.get("emulator"))
        rows.append(row)
    present = any(row["offsite_eval_accuracy"] is not None or row["emulator_clients"] for row in rows)
    initial = initial_of(run, summary) or {}
    package = summary.get("offsite") if isinstance(summary.get("offsite"), dict) else {}
    return {
        "present": present or bool(package),
        "initial": {k: num(initial.get(k)) for k in keys},
        "rounds": rows,
        "package": {k: package[k] for k in OFFSITE_PACKAGE if k in package},
    }
