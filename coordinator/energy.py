"""Energy and carbon of a client's round, of a round and of a run: pure arithmetic.

    joules  = train-watts x compute seconds
            + joules-per-mb-sent x upload MB + joules-per-mb-received x download MB
    Wh      = joules / 3600
    gCO2e   = joules / 3.6e6 (kWh) x carbon-intensity (gCO2e/kWh)

Compute seconds: a simulated client's training seconds divided by its profile's `speed` (the
same device time `coordinator.planner.simulated_seconds` uses). Those seconds are measured on
this machine, so they grow with its load; with `simulated-gflops` G > 0 they are the client's
counted training GFLOPs (finetune/flops.py, reply metric `train-gflops`) over G instead, the
same on any machine under any load. A deployed
client's own measured seconds (its reply's `train-seconds`, checked by the reply schema),
capped at the round timeout so one client's claim cannot dominate a run's account. MB are
1e6 bytes, of the encoded upload and of the arrays the client was sent. Figures come from the
client's device profile (protos/profile.py); see the README section "Energy and carbon".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from protos.profile import DeviceProfile

JOULES_PER_WH = 3600.0
JOULES_PER_KWH = 3.6e6
BYTES_PER_MB = 1e6


@dataclass(frozen=True)
class Energy:
    """One client's round: joules by component, and the carbon of the total."""

    compute_joules: float
    upload_joules: float
    download_joules: float
    carbon_intensity: float  # gCO2e per kWh

    @property
    def joules(self) -> float:
        return self.compute_joules + self.upload_joules + self.download_joules

    @property
    def wh(self) -> float:
        return self.joules / JOULES_PER_WH

    @property
    def gco2e(self) -> float:
        return self.joules / JOULES_PER_KWH * self.carbon_intensity

    def fields(self) -> dict[str, float]:
        """clients.jsonl fields."""
        return {"energy_joules": self.joules, "energy_wh": self.wh, "gco2e": self.gco2e, "compute_joules": self.compute_joules}


def reference_seconds(train_seconds: float, gflops: float = 0.0, simulated_gflops: float = 0.0) -> float:
    """Seconds of a speed-1 device: the counted GFLOPs over `simulated_gflops` when both are
    positive, else the measured seconds."""
    return gflops / simulated_gflops if gflops > 0 and simulated_gflops > 0 else train_seconds


def compute_seconds(profile: DeviceProfile, train_seconds: float, simulated: bool, cap: float = math.inf,
                    gflops: float = 0.0, simulated_gflops: float = 0.0) -> float:
    """Device compute seconds: a simulated client's reference seconds over the profile's speed,
    a deployed client's as measured on the device; never negative, at most `cap`."""
    seconds = reference_seconds(train_seconds, gflops, simulated_gflops) / profile.speed if simulated else train_seconds
    return min(max(0.0, seconds), cap)


def client_energy(profile: DeviceProfile, seconds: float, upload_bytes: float, download_bytes: float) -> Energy:
    """The energy of `seconds` of compute and the given transfers on `profile`'s device."""
    return Energy(
        profile.train_watts * seconds,
        profile.joules_per_mb_sent * upload_bytes / BYTES_PER_MB,
        profile.joules_per_mb_received * download_bytes / BYTES_PER_MB,
        profile.carbon_intensity,
    )


def reply_energy(profile: DeviceProfile, metrics: Mapping[str, Any], simulated: bool, config: Any, upload_bytes: float, download_bytes: float) -> tuple[Energy, float]:
    """A client's round from its checked reply metrics (`train-seconds`, `train-gflops`) and the run
    config (`simulated-gflops` applies to simulated clients only, `round-timeout` caps the seconds):
    (its energy, its compute seconds at speed 1 for the battery and selection model)."""
    train_seconds, gflops = float(metrics.get("train-seconds", 0.0)), float(metrics.get("train-gflops", 0.0))
    sim_gflops = float(getattr(config, "simulated_gflops", 0.0)) if simulated else 0.0
    seconds = compute_seconds(profile, train_seconds, simulated, float(getattr(config, "round_timeout", 3600.0)), gflops, sim_gflops)
    return client_energy(profile, seconds, upload_bytes, download_bytes), reference_seconds(train_seconds, gflops, sim_gflops)


def total_fields(energies: Iterable[Energy]) -> dict[str, float]:
    """metrics.jsonl fields of a round (or run): summed joules, Wh and gCO2e."""
    items = list(energies)
    joules = sum(e.joules for e in items)
    return {"energy_joules": joules, "energy_wh": joules / JOULES_PER_WH, "gco2e": sum(e.gco2e for e in items)}


def jain_index(counts: Iterable[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n sum x^2) of non-negative amounts: 1 when all are
    equal, 1/n when one client has everything; None without any amount."""
    values = [float(c) for c in counts]
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if values and squares > 0 else None


def run_energy(rounds: Iterable[Mapping[str, Any]]) -> dict[str, float] | None:
    """A run's totals from its metrics.jsonl rows (None when no row has energy), with the last
    round's participation fairness."""
    rows = [r for r in rounds if isinstance(r.get("energy_joules"), (int, float))]
    if not rows:
        return None
    joules = float(sum(r["energy_joules"] for r in rows))
    totals = {"energy_joules": joules, "energy_wh": joules / JOULES_PER_WH, "gco2e": float(sum(r.get("gco2e", 0.0) for r in rows))}
    if isinstance(rows[-1].get("jain_index"), (int, float)):
        totals["jain_index"] = float(rows[-1]["jain_index"])
    return totals


def energy_markdown(rounds: list[Mapping[str, Any]]) -> list[str]:
    """summary.md's energy section: per round and in total (empty without energy figures)."""
    totals = run_energy(rounds)
    if totals is None:
        return []
    lines = ["", "## Energy and carbon", "", "| round | clients | joules | Wh | gCO2e | Jain's index |", "|---:|---:|---:|---:|---:|---:|"]
    for row in rounds:
        if "energy_joules" in row:
            jain = row.get("jain_index")
            lines.append(f"| {row['round']} | {len(row.get('selected', row.get('contributors', [])))} | {row['energy_joules']:.1f} | {row['energy_wh']:.4f} "
                         f"| {row['gco2e']:.4f} | {'–' if jain is None else f'{jain:.3f}'} |")
    jain = totals.get("jain_index")
    lines.append(f"| total | | {totals['energy_joules']:.1f} | {totals['energy_wh']:.4f} | {totals['gco2e']:.4f} | {'–' if jain is None else f'{jain:.3f}'} |")
    return lines
