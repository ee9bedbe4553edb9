"""Experiment files: a run config plus a client population and an optional sweep, in one TOML.

    model = "tiny"                 # top-level keys: any `fedsite simulate` option (FedsiteConfig field)
    num-server-rounds = 3

    [population]                   # data partitioning and round timing
    clients = 500                  # also: partitioning, dirichlet-alpha, shards-per-client,
    partitioning = "iid"           #       partition-size-sigma (iid quantity skew)
    deadline = 60.0                # simulated seconds a round waits; slower clients are stragglers
    upload-seconds = 5.0           # adaptive codec: most precise one uploading within this

    [[profiles]]                   # device kinds; shares sum to 1 (protos.profile.DeviceProfile)
    name = "phone"
    share = 0.7
    speed = 0.25
    bandwidth-mbps = 4.0
    quantized = true
    lora-rank = 4
    availability = 0.8
    dropout = 0.1

    [sweep]                        # `fedsite sweep`: the grid of options, each run once per seed
    aggregation = ["fedavg", "hetlora"]
    seeds = [0, 1]

A flat file of options (what `config.toml` in a results folder holds) is an experiment without
tables. The run config keeps the experiment's path in `experiment`, so the coordinator (under
`fedsite simulate` or `flwr run .`) rebuilds the same population from it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protos.profile import DeviceProfile
from finetune.config import ConfigError, FedsiteConfig, from_mapping
from simulations.population import Population, profile_from_mapping

# [population] keys that are run-config fields (clients need them to find their data)
POPULATION_CONFIG_KEYS = ("clients", "partitioning", "dirichlet-alpha", "shards-per-client", "partition-size-sigma")
# [population] keys only the coordinator's population model reads
POPULATION_OWN_KEYS = {"deadline": 0.0, "upload-seconds": 5.0}
TABLES = ("population", "profiles", "sweep")


@dataclass
class Sweep:
    """A grid over config fields (kebab keys -> values), each combination run once per seed."""

    grid: dict[str, list[Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])


@dataclass
class Experiment:
    config: FedsiteConfig
    profiles: tuple[DeviceProfile, ...] = ()
    deadline: float = 0.0
    upload_seconds: float = 5.0
    sweep: Sweep | None = None
    path: Path | None = None

    def population(self, config: FedsiteConfig | None = None) -> Population:
        """The population for `config` (its clients and seed; default: the experiment's own)."""
        config = config or self.config
        profiles = self.profiles or (DeviceProfile("default"),)
        return Population(profiles, config.clients, config.seed, self.deadline, self.upload_seconds)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"experiment file '{path}' not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"experiment file '{path}': invalid TOML: {err}") from None


def parse_experiment(values: dict[str, Any], path: Path | None = None, base: FedsiteConfig | None = None) -> Experiment:
    """An Experiment from parsed TOML; every mistake is a one-line ConfigError naming it."""
    where = f"experiment file '{path}'" if path else "experiment"
    flat = {k: v for k, v in values.items() if k not in TABLES}
    for key, value in flat.items():
        if isinstance(value, dict):
            raise ConfigError(f"{where}: unknown table [{key}] (expected {', '.join(f'[{t}]' for t in TABLES)} or config fields)")
    population = values.get("population", {})
    profiles = values.get("profiles", [])
    if not isinstance(population, dict):
        raise ConfigError(f"{where}: 'population' must be a table [population]")
    if not isinstance(profiles, list) or not all(isinstance(p, dict) for p in profiles):
        raise ConfigError(f"{where}: 'profiles' must be an array of tables [[profiles]]")
    unknown = sorted(set(population) - set(POPULATION_CONFIG_KEYS) - set(POPULATION_OWN_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' in [population] (expected {', '.join([*POPULATION_CONFIG_KEYS, *POPULATION_OWN_KEYS])})")
    flat.update({k: population[k] for k in POPULATION_CONFIG_KEYS if k in population})
    has_population = bool(population or profiles)
    if has_population and path is not None:
        flat["experiment"] = str(path.resolve())
    config = from_mapping(flat, base)
    own = {}
    for key, default in POPULATION_OWN_KEYS.items():
        value = population.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: [population] {key} = {value!r} is not a number")
        own[key] = float(value)
    try:
        parsed = tuple(profile_from_mapping(p, i) for i, p in enumerate(profiles))
        experiment = Experiment(config, parsed, own["deadline"], own["upload-seconds"], parse_sweep(values.get("sweep"), config, where), path)
        if has_population:
            experiment.population()  # shares, names and timing checked now, not in round 1
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return experiment


def parse_sweep(table: Any, config: FedsiteConfig, where: str) -> Sweep | None:
    """The [sweep] table; each value of each key is checked against the config now."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: 'sweep' must be a table [sweep]")
    seeds = table.get("seeds", [config.seed])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{where}: [sweep] seeds = {seeds!r} must be a non-empty list of integers")
    grid: dict[str, list[Any]] = {}
    for key, values in table.items():
        if key == "seeds":
            continue
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: [sweep] {key} = {values!r} must be a non-empty list of values")
        if key.replace("_", "-") in ("seed", "out", "experiment"):
            raise ConfigError(f"{where}: [sweep] cannot vary '{key}' (use seeds = [...] for seeds)")
        for value in values:
            from_mapping({key: value}, config)  # unknown key or bad value: one line, before any run
        grid[key.replace("_", "-")] = values
    return Sweep(grid, [int(s) for s in seeds])


def load_experiment(path: str | Path, base: FedsiteConfig | None = None) -> Experiment:
    """Read an experiment file (flat config keys, optionally [population], [[profiles]], [sweep])."""
    path = Path(path)
    return parse_experiment(_read(path), path, base)


def resolve(path: str) -> Path:
    """An experiment path as given, else relative to the app's root (a Flower app runs elsewhere)."""
    candidate = Path(path)
    if candidate.is_file() or candidate.is_absolute():
        return candidate
    return Path(__file__).resolve().parents[1] / path


def load_population(config: FedsiteConfig) -> Population:
    """The population named by `config.experiment`, sized by `config.clients` and seeded by `config.seed`."""
    return load_experiment(resolve(config.experiment)).population(config)


def population_for(config: FedsiteConfig) -> Population | None:
    """The run's population model for the coordinator's planner: the experiment's, or with
    `emulator-share` alone that share of the clients may not hold the backbone; else None."""
    if config.experiment:
        return load_population(config)
    if config.emulator_share <= 0:
        return None
    profiles = (DeviceProfile("backbone", 1.0 - config.emulator_share), DeviceProfile("no-backbone", config.emulator_share, holds_backbone=False))
    return Population(tuple(p for p in profiles if p.share > 0), config.clients, config.seed)
