"""The energy part of `fedsite report`: per-run energy, carbon and participation fairness, and a plot.

Reads the fields the coordinator writes (coordinator/energy.py, coordinator/selection.py):
`energy_joules`, `energy_wh`, `gco2e`, `jain_index`, `client_selection` per round in
metrics.jsonl. Runs from before energy accounting simply show no figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simulations.report import RunData, _finish, _fmt, _num, _pyplot, _table


def energy_summary(run: RunData) -> dict[str, Any]:
    """Run totals: joules, Wh, gCO2e (None without energy figures), last Jain's index, selection."""
    rounds = [r for r in run.rounds if _num(r.get("energy_joules")) is not None]
    joules = sum(_num(r["energy_joules"]) for r in rounds) if rounds else None
    jain = next((_num(r.get("jain_index")) for r in reversed(run.rounds) if _num(r.get("jain_index")) is not None), None)
    selection = run.config.get("client-selection") or next((r.get("client_selection") for r in run.rounds if r.get("client_selection")), None)
    return {
        "energy_joules": joules,
        "energy_wh": joules / 3600 if joules is not None else None,
        "gco2e": sum(_num(r.get("gco2e")) or 0.0 for r in rounds) if rounds else None,
        "jain_index": jain,
        "client_selection": selection,
    }


def energy_markdown(summaries: list[dict[str, Any]]) -> list[str]:
    """The report's energy section (empty when no run has energy figures)."""
    if not any(s.get("energy", {}).get("energy_joules") is not None for s in summaries):
        return []
    rows = []
    for s in summaries:
        e = s.get("energy", {})
        rows.append([_fmt(s["name"]), _fmt(e.get("client_selection")), _fmt(e.get("energy_joules"), 1), _fmt(e.get("energy_wh"), 4),
                     _fmt(e.get("gco2e"), 4), _fmt(e.get("jain_index"))])
    return ["", "## Energy and carbon", "", *_table(["run", "client selection", "joules", "Wh", "gCO2e", "Jain's index"], rows, 2)]


def plot_energy(runs: list[RunData], path: Path) -> None:
    """Cumulative Wh per round (solid) and cumulative gCO2e (dashed, right axis), one colour per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    carbon = ax.twinx()
    plotted = False
    for i, run in enumerate(runs):
        wh, co2, xs, total_wh, total_co2 = [], [], [], 0.0, 0.0
        for r in run.rounds:
            if _num(r.get("energy_joules")) is None:
                continue
            total_wh += _num(r["energy_joules"]) / 3600
            total_co2 += _num(r.get("gco2e")) or 0.0
            xs.append(r["round"])
            wh.append(total_wh)
            co2.append(total_co2)
        if xs:
            ax.plot(xs, wh, color=f"C{i}", marker="o", markersize=3, label=f"{run.name} Wh")
            carbon.plot(xs, co2, color=f"C{i}", linestyle="--", marker="s", markersize=3)
            plotted = True
    carbon.set_ylabel("cumulative gCO2e (dashed)")
    _finish(fig, ax, path, plotted, title="energy (solid, Wh) and carbon (dashed, gCO2e)", xlabel="round", ylabel="cumulative Wh")
