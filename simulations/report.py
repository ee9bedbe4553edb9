"""Compare Fedsite runs side by side: PNG plots, a markdown table for people, JSON for machines.

Reads only the results folders runs leave behind (see `coordinator/results.py`), so it works on
runs from any version: every field except `round` in `metrics.jsonl` is optional (the round-0
baseline row has no training keys at all; older runs lack that row and have the baseline only in
`summary.json`), and a plot or column with no data for any run is left empty rather than failing.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

PLOTS = ("accuracy", "loss", "bytes", "participation", "time_to_accuracy", "energy")


class ReportError(ValueError):
    """A results folder that cannot be read; the message is one line naming the file."""


@dataclass
class RunData:
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------ reading
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_run(folder: str | Path) -> RunData:
    """Read one results folder; only `metrics.jsonl` is required."""
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{metrics}: not found (expected a Fedsite results folder with metrics.jsonl)")
    rounds = _read_jsonl(metrics)
    for number, row in enumerate(rounds, start=1):
        if not isinstance(row.get("round"), int):
            raise ReportError(f"{metrics}: round {number}: expected an integer 'round' field")
    by_round = {row["round"]: row for row in rounds}  # a repeated round keeps its last record
    clients_path, summary_path, config_path = folder / "clients.jsonl", folder / "summary.json", folder / "config.toml"
    clients = _read_jsonl(clients_path) if clients_path.is_file() else []
    summary = _read_json(summary_path) if summary_path.is_file() else {}
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = tomllib.loads(config_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ReportError(f"{config_path}: not valid TOML ({exc})") from None
    initial = summary.get("initial") if isinstance(summary, dict) else None
    baseline = by_round.pop(0, None)  # metrics.jsonl's first row: the round-0 evaluation, no training keys
    if not isinstance(initial, dict):  # a run still going (or from before summary.json) has only the row
        initial = {k: v for k, v in baseline.items() if k != "round"} if baseline else None
    return RunData(folder.resolve().name, config, [by_round[r] for r in sorted(by_round)], clients, initial)


# ---------------------------------------------------------------------------------- numbers
def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _count(value: Any) -> int:
    """Participation fields are lists of ids, but tolerate a plain count."""
    return len(value) if isinstance(value, (list, tuple, dict)) else int(value) if _num(value) is not None else 0


def _points(run: RunData) -> list[dict[str, Any]]:
    """Rounds with the initial evaluation as round 0, when there is one."""
    return ([{"round": 0, **run.initial}] if run.initial else []) + run.rounds


def _time_key(run: RunData) -> str | None:
    """Simulated device time when the run has it, else measured wall-clock time (whole rounds,
    central evaluation included, where the run records `total_seconds`)."""
    for key in ("simulated_seconds", "total_seconds", "round_seconds"):
        if any(_num(r.get(key)) is not None for r in run.rounds):
            return key
    return None


def _config_label(run: RunData) -> dict[str, Any]:
    cfg, last = run.config, run.rounds[-1] if run.rounds else {}
    part = cfg.get("partitioning")
    if part == "dirichlet" and cfg.get("dirichlet-alpha") is not None:
        part = f"dirichlet(α={cfg['dirichlet-alpha']})"
    return {
        "model": cfg.get("model"),
        "clients": cfg.get("clients"),
        "rounds": cfg.get("num-server-rounds", len(run.rounds)),
        "partitioning": part,
        "aggregation": cfg.get("aggregation", last.get("aggregation")),
        "dp": cfg.get("dp"),
        "codec": cfg.get("upload-codec"),
        "secure": cfg.get("secure", last.get("secure")),
    }


def summarize(run: RunData) -> dict[str, Any]:
    """The numbers report.md and report.json show for one run."""
    rounds, last = run.rounds, run.rounds[-1] if run.rounds else {}
    scored = [(p["round"], _num(p.get("eval_accuracy"))) for p in _points(run)]
    scored = [(r, a) for r, a in scored if a is not None]
    best_round, best = max(scored, key=lambda ra: (ra[1], -ra[0])) if scored else (None, None)
    upload = sum(_num(r.get("upload_bytes")) or 0 for r in rounds)
    has_download = any("download_bytes" in r for r in rounds)
    time_key = _time_key(run)
    if any("rejected" in r for r in rounds):
        rejected = sum(_count(r.get("rejected")) for r in rounds)
    else:
        rejected = sum(c.get("status") == "rejected" for c in run.clients)
    sampled = sum(_count(r.get("sampled")) for r in rounds)
    contributed = sum(_count(r.get("contributors")) for r in rounds)
    return {
        "name": run.name,
        "config": _config_label(run),
        "rounds_run": len(rounds),
        "initial_accuracy": _num((run.initial or {}).get("eval_accuracy")),
        "final_accuracy": _num(last.get("eval_accuracy")),
        "best_accuracy": best,
        "best_round": best_round,
        "final_eval_loss": _num(last.get("eval_loss")),
        "total_upload_bytes": int(upload),
        "total_upload_mb": upload / 1e6,
        "total_download_bytes": int(sum(_num(r.get("download_bytes")) or 0 for r in rounds)) if has_download else None,
        "total_seconds": sum(_num(r.get(time_key)) or 0 for r in rounds) if time_key else None,
        "time_basis": {"simulated_seconds": "simulated", "total_seconds": "wall", "round_seconds": "wall"}.get(time_key or ""),
        "rejected_updates": int(rejected),
        "dropped": sum(_count(r.get("dropped")) for r in rounds),
        "stragglers": sum(_count(r.get("stragglers")) for r in rounds),
        "unavailable": sum(_count(r.get("unavailable")) for r in rounds),
        "mean_sampled": sampled / len(rounds) if rounds else None,
        "mean_contributors": contributed / len(rounds) if rounds else None,
        "participation_rate": contributed / sampled if sampled else None,
        "final_per_task": dict(last.get("eval_per_task") or {}),
        "initial_per_task": dict((run.initial or {}).get("eval_per_task") or {}),
        "energy": _energy().energy_summary(run),
    }


def _energy():
    """The energy section (simulations/report_energy.py imports this module's helpers)."""
    from simulations import report_energy

    return report_energy


# ----------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _line(ax, points: list[dict[str, Any]], key: str, scale: float = 1.0, **style: Any) -> bool:
    """Plot `key` per round, skipping rounds without it; False when there was nothing to plot."""
    xy = [(p["round"], _num(p.get(key))) for p in points]
    xy = [(x, y * scale) for x, y in xy if y is not None]
    if xy:
        ax.plot(*zip(*xy), **style)
    return bool(xy)


def _finish(fig, ax, path: Path, plotted: bool, **labels: Any) -> None:
    ax.set(**labels)
    ax.grid(alpha=0.3)
    if labels.get("xlabel") == "round":
        ax.xaxis.get_major_locator().set_params(integer=True)
    if plotted:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def _plot_metric(runs: list[RunData], path: Path, series: list[tuple[str, str, str]], scale: float, **labels: Any) -> None:
    """One colour per run; `series` is (key, label suffix, linestyle) drawn for every run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for i, run in enumerate(runs):
        for key, suffix, style in series:
            points = _points(run) if key in ("eval_accuracy", "eval_loss") else run.rounds
            plotted |= _line(ax, points, key, scale, color=f"C{i}", linestyle=style, marker="o", markersize=3,
                             label=f"{run.name}{suffix}")
    _finish(fig, ax, path, plotted, **labels)


def _plot_participation(runs: list[RunData], path: Path) -> None:
    """Grouped bars per round, one panel per run: lines of four series for many runs are unreadable."""
    plt = _pyplot()
    cols = min(len(runs), 3)
    rows = -(-len(runs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.3 * rows), squeeze=False, sharey=True)
    keys = ("sampled", "contributors", "rejected", "dropped", "stragglers", "unavailable")  # stragglers are also rejected
    width = 0.8 / len(keys)
    for ax, run in zip(axes.flat, runs):
        xs = [r["round"] for r in run.rounds]
        for j, key in enumerate(keys):
            ax.bar([x + (j - (len(keys) - 1) / 2) * width for x in xs], [_count(r.get(key)) for r in run.rounds], width,
                   label=key, color=f"C{j}")
        ax.set(title=run.name, xlabel="round", ylabel="clients", xticks=xs)
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(keys), 3 * cols), fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / (3.3 * rows)))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_time(runs: list[RunData], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted, bases = False, set()
    for i, run in enumerate(runs):
        key = _time_key(run)
        if key is None:
            continue
        bases.add("simulated" if key == "simulated_seconds" else "wall-clock")
        t, xy = 0.0, [(0.0, _num(run.initial.get("eval_accuracy")))] if run.initial else []
        for r in run.rounds:
            t += _num(r.get(key)) or 0.0
            xy.append((t, _num(r.get("eval_accuracy"))))
        xy = [(x, y) for x, y in xy if y is not None]
        if xy:
            sim = " (simulated)" if key == "simulated_seconds" else ""
            ax.plot(*zip(*xy), color=f"C{i}", marker="o", markersize=3, label=run.name + sim)
            plotted = True
    basis = "seconds (simulated where available)" if len(bases) > 1 else f"{''.join(bases) or 'round'} seconds"
    _finish(fig, ax, path, plotted, title="time to accuracy", xlabel=f"cumulative {basis}",
            ylabel="held-out exact match", ylim=(-0.02, 1.02))


def write_plots(runs: list[RunData], out: Path) -> list[Path]:
    _plot_metric(runs, out / "accuracy.png", [("eval_accuracy", "", "-")], 1.0, title="held-out exact match",
                 xlabel="round", ylabel="accuracy", ylim=(-0.02, 1.02))
    _plot_metric(runs, out / "loss.png", [("eval_loss", " eval", "-"), ("train_loss", " train", "--")], 1.0,
                 title="loss (eval solid, train dashed)", xlabel="round", ylabel="loss")
    _plot_metric(runs, out / "bytes.png", [("upload_bytes", " upload", "-"), ("download_bytes", " download", "--")],
                 1e-6, title="bytes per round (upload solid, download dashed)", xlabel="round", ylabel="MB", ylim=(0, None))
    _plot_participation(runs, out / "participation.png")
    _plot_time(runs, out / "time_to_accuracy.png")
    _energy().plot_energy(runs, out / "energy.png")
    return [out / f"{name}.png" for name in PLOTS]


# ---------------------------------------------------------------------------------- report
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """Text columns (the first `text_columns`) align left, numbers right."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + ["| " + " | ".join(r) + " |" for r in rows]


def report_markdown(summaries: list[dict[str, Any]]) -> str:
    """Comparison table, per-task final accuracy, then the plots; config columns only where set."""
    config_keys = [k for k in summaries[0]["config"] if any(s["config"][k] is not None for s in summaries)]
    header = ["run", *config_keys, "initial acc", "final acc", "best acc (round)", "final eval loss",
              "upload MB", "time s", "rejected", "dropouts / stragglers / unreachable", "mean contributors / sampled"]
    rows = []
    for s in summaries:
        time = _fmt(s["total_seconds"], 1) + (" (sim)" if s["time_basis"] == "simulated" else "")
        part = f"{_fmt(s['mean_contributors'], 1)} / {_fmt(s['mean_sampled'], 1)}"
        rows.append([_fmt(s["name"]), *(_fmt(s["config"][k]) for k in config_keys), _fmt(s["initial_accuracy"]),
                     _fmt(s["final_accuracy"]), f"{_fmt(s['best_accuracy'])} ({_fmt(s['best_round'])})",
                     _fmt(s["final_eval_loss"]), _fmt(s["total_upload_mb"], 2), time,
                     str(s["rejected_updates"]), f"{s['dropped']} / {s['stragglers']} / {s['unavailable']}", part])
    lines = ["# Fedsite runs compared", "", *_table(header, rows, 1 + len(config_keys))]
    tasks = sorted({t for s in summaries for t in s["final_per_task"]})
    if tasks:
        lines += ["", "## Final accuracy per task", "",
                  *_table(["task", *(_fmt(s["name"]) for s in summaries)],
                          [[t, *(_fmt(s["final_per_task"].get(t)) for s in summaries)] for t in tasks])]
    lines += _energy().energy_markdown(summaries)
    lines += ["", "## Plots", ""] + [f"![{name}]({name}.png)\n" for name in PLOTS]
    return "\n".join(lines)


def _unique_names(runs: list[RunData], folders: Sequence[str | Path]) -> None:
    """Two folders both called `run` get their parent's name prefixed so legends stay distinct."""
    clashing = {r.name for r in runs if sum(o.name == r.name for o in runs) > 1}
    for run, folder in zip(runs, folders):
        if run.name in clashing:
            run.name = f"{Path(folder).resolve().parent.name}/{run.name}"


def write_report(folders: Sequence[str | Path], out: str | Path) -> Path:
    """Write report.md, report.json and the plots comparing `folders` into `out`; returns report.md."""
    if not folders:
        raise ReportError("no results folders given to compare")
    runs = [load_run(f) for f in folders]
    _unique_names(runs, folders)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_plots(runs, out)
    summaries = [summarize(run) for run in runs]
    (out / "report.json").write_text(json.dumps({"runs": summaries, "plots": [f"{p}.png" for p in PLOTS]}, indent=2))
    path = out / "report.md"
    path.write_text(report_markdown(summaries))
    return path
