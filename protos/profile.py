"""A device profile: what a kind of device can do, as clients report it and simulations draw it.

Part of the wire contract below both sides: a deployed client describes its device in its node
config (`fedsite client --memory-gb --no-backbone --quantized --profile --device`: its
accelerator's kind and memory are measured on the device), answers the
coordinator's query with it, and the coordinator's planner decides the client's package from
it; a simulated population (simulations/population.py) draws profiles from an experiment file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protos.codecs import CODECS

ACCELERATORS = ("none", "cuda", "mps")  # the kinds of accelerator a device reports
# power figures and their plausible upper bounds (a 10 kW device, 1 kJ per MB, 10 kWh battery, 2 kg/kWh grid)
POWER_LIMITS = {"train-watts": 1e4, "joules-per-mb-sent": 1e3, "joules-per-mb-received": 1e3, "battery-wh": 1e4, "carbon-intensity": 2000.0}


@dataclass(frozen=True)
class DeviceProfile:
    """What a kind of device can do; `share` is its fraction of the population."""

    name: str
    share: float = 1.0
    speed: float = 1.0  # compute relative to the machine that runs the simulation (0.5 = twice as slow)
    memory_gb: float = 0.0  # 0 = unlimited; else the backbone must fit (fp32, then 4-bit) or the client gets an emulator
    bandwidth_mbps: float = 100.0  # link speed, both directions, megabits per second
    holds_backbone: bool = True  # False: the client must not hold the backbone (offsite emulator)
    quantized: bool = False  # frozen backbone in 4-bit NF4 (QLoRA)
    accelerator: str = "none"  # what it trains on: none (CPU), cuda or mps
    accelerator_memory_gb: float = 0.0  # the accelerator's memory; with an accelerator it bounds the backbone instead of memory-gb (0 = unknown/unlimited)
    lora_rank: int = 0  # 0 = the run's lora-rank; smaller ranks need aggregation 'hetlora'
    upload_codec: str = ""  # "" = adaptive from bandwidth; else fp32, fp16, int8 or 4bit
    availability: float = 1.0  # probability the client is reachable in a round
    dropout: float = 0.0  # probability a reachable client vanishes after receiving its package
    # power (coordinator/energy.py): joules = train-watts x compute seconds + per-MB costs of the link
    train_watts: float = 10.0  # device power draw while training
    joules_per_mb_sent: float = 1.0  # radio/network energy per MB uploaded (1e6 bytes)
    joules_per_mb_received: float = 0.5  # per MB downloaded
    battery_wh: float = 0.0  # battery capacity; 0 = mains-powered (no battery to drain)
    carbon_intensity: float = 475.0  # grid carbon intensity of its power, gCO2e per kWh

    def validate(self) -> DeviceProfile:
        checks = [
            ("share", self.share > 0, "positive"),
            ("speed", self.speed > 0, "positive"),
            ("memory-gb", self.memory_gb >= 0, "non-negative"),
            ("accelerator", self.accelerator in ACCELERATORS, "one of " + ", ".join(ACCELERATORS)),
            ("accelerator-memory-gb", self.accelerator_memory_gb >= 0 and (self.accelerator != "none" or self.accelerator_memory_gb == 0), "non-negative, and 0 without an accelerator"),
            ("bandwidth-mbps", self.bandwidth_mbps > 0, "positive"),
            ("lora-rank", self.lora_rank >= 0, "non-negative"),
            ("upload-codec", self.upload_codec in ("", *CODECS, "adaptive"), "empty (from bandwidth) or one of " + ", ".join((*CODECS, "adaptive"))),
            ("availability", 0.0 < self.availability <= 1.0, "in (0, 1]"),
            ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            *((key, math.isfinite(getattr(self, key.replace("-", "_"))) and 0 <= getattr(self, key.replace("-", "_")) <= limit, f"a number in [0, {limit:g}]")
              for key, limit in POWER_LIMITS.items()),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ValueError(f"profile '{self.name}': {key} = {getattr(self, key.replace('-', '_'))!r} must be {expected}")
        return self


DEFAULT_PROFILE = DeviceProfile("default")
