"""Each sampled client's package, decided from its device profile; simulated device time.

The coordinator sees Flower node ids, not devices. The first time a node is sampled it is
asked (a `query` message, answered by the ClientApp) for its partition id and the profile
name in its node config; the answer is cached per node. A `PopulationModel` (in simulation,
`simulations.population.Population`, handed over by the simulation's front door: the
coordinator imports nothing from simulations/) maps a partition id to a `DeviceProfile`
(`protos/profile.py`, the part of the wire contract a deployed client reports) and says, per
round, whether the client is reachable and whether it drops out after receiving its package.

A package is a few overrides of the run config, put in that client's own ConfigRecord: LoRA
rank (HetLoRA: rank-r clients get the first r rank directions of the global adapter, alpha
scaled with r so alpha/r stays the run's), 4-bit backbone, upload codec (the most precise one
whose upload fits the profile's link in `upload_seconds`) and kind ("lora" or "emulator").
The backbone must fit the memory the client trains in: its accelerator's (a GPU with enough
memory gets the full-precision backbone, whatever its host memory), else its `memory-gb`
(too little: NF4, or below an eighth of the backbone, an emulator).

Simulated time of a client: download / bandwidth + measured train seconds / speed + upload /
bandwidth. A client slower than the round deadline is a straggler: the coordinator stops
waiting for it, so its update is dropped from the aggregate, with the reason recorded.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from aggregation.hetero_rank import pad_to_rank, truncate_to_rank
from coordinator.energy import compute_seconds
from coordinator.replies import read_query_answer
from finetune.base_delta import BASE_PREFIX
from finetune.choices import BASE_RULES
from protos.profile import DEFAULT_PROFILE, DeviceProfile
from protos.tensors import from_array_record, to_array_record

log = logging.getLogger("fedsite.coordinator")

# rules that take updates of smaller LoRA ranks (padded, or stacked) from weaker devices
HETERO_RANK_RULES = ("hetlora", "flora")
# Bits per value on the wire, most precise first (int8 and 4bit carry small per-block scales).
CODEC_BITS = {"fp32": 32.0, "fp16": 16.0, "int8": 8.25, "4bit": 4.5}
QUERY_TIMEOUT = 600.0




@dataclass(frozen=True)
class Package:
    """What one client is asked to do this round, as run-config overrides."""

    profile: str
    kind: str  # "lora" | "emulator" (emulator clients train LoRA until the emulator path lands)
    lora_rank: int
    lora_alpha: int
    quantize: str
    upload_codec: str

    def overrides(self) -> dict[str, Any]:
        return {
            "lora-rank": self.lora_rank,
            "lora-alpha": self.lora_alpha,
            "quantize": self.quantize,
            "upload-codec": self.upload_codec,
            "package-kind": self.kind,
            "profile": self.profile,
        }


class PopulationModel(Protocol):
    deadline: float  # simulated seconds per round; 0 = none
    upload_seconds: float  # target upload time that picks the adaptive codec

    def profile_of(self, partition_id: int) -> DeviceProfile: ...

    def event(self, server_round: int, partition_id: int) -> str:
        """'train', 'unavailable' or 'dropout' for this client in this round (seeded)."""
        ...


def choose_codec(num_values: int, bandwidth_mbps: float, upload_seconds: float) -> str:
    """The most precise codec whose upload of `num_values` takes at most `upload_seconds`; else 4bit."""
    for codec, bits in CODEC_BITS.items():
        if num_values * bits / (bandwidth_mbps * 1e6) <= upload_seconds:
            return codec
    return "4bit"


def plan_package(profile: DeviceProfile, run: Mapping[str, Any], num_values: int, upload_seconds: float, backbone_gb: float = 0.0, rule: str = "fedavg") -> Package:
    """`profile`'s package under the run config `run` (kebab keys) for an update of `num_values` values."""
    rank = int(run["lora-rank"])
    if profile.lora_rank and profile.lora_rank != rank and rule in HETERO_RANK_RULES:
        rank = min(rank, profile.lora_rank)
    alpha = max(1, round(int(run["lora-alpha"]) * rank / int(run["lora-rank"])))
    quantize = "nf4" if profile.quantized else str(run.get("quantize", "none"))
    kind = "lora" if profile.holds_backbone else "emulator"
    memory = training_memory_gb(profile)
    if memory and kind == "lora" and backbone_gb > memory and rule not in BASE_RULES:
        # fp32 does not fit: a 4-bit backbone takes about an eighth; below that, an emulator
        quantize, kind = ("nf4", "lora") if backbone_gb / 8 <= memory else (quantize, "emulator")
    values = num_values * rank // int(run["lora-rank"])
    adaptive = str(run.get("upload-codec", "")) == "adaptive"  # per module by importance, within the client's budget
    codec = profile.upload_codec or ("adaptive" if adaptive else choose_codec(values, profile.bandwidth_mbps, upload_seconds))
    return Package(profile.name, kind, rank, alpha, quantize, codec)


def training_memory_gb(profile: DeviceProfile) -> float:
    """The memory the backbone must fit in (0 = unbounded): a device with an accelerator trains
    there, so its accelerator's memory (when reported); a CPU-only device its `memory-gb`."""
    if profile.accelerator != "none" and profile.accelerator_memory_gb:
        return profile.accelerator_memory_gb
    return profile.memory_gb


def simulated_seconds(profile: DeviceProfile, train_seconds: float, upload_bytes: float, download_bytes: float,
                      gflops: float = 0.0, simulated_gflops: float = 0.0) -> float:
    """Device time of one client's round: transfer at the profile's bandwidth, compute at its speed
    (from counted GFLOPs when `simulated_gflops` > 0: coordinator/energy.py)."""
    link = profile.bandwidth_mbps * 1e6 / 8  # bytes per second
    return download_bytes / link + compute_seconds(profile, train_seconds, True, gflops=gflops, simulated_gflops=simulated_gflops) + upload_bytes / link


@dataclass
class _Sent:
    partition_id: int
    profile: DeviceProfile
    package: Package
    download_bytes: int


@dataclass
class Planner:
    """Per-round planning and straggler accounting; the only state is what was sent to whom."""

    population: PopulationModel
    run: dict[str, Any]  # the run config, kebab keys
    rule: str = "fedavg"
    backbone_gb: float = 0.0
    _partition: dict[int, int] = field(default_factory=dict)  # node id -> partition id (or -1)
    _named: dict[int, str] = field(default_factory=dict)  # node id -> profile name from its node config
    _reported: dict[int, DeviceProfile] = field(default_factory=dict)  # node id -> profile a deployed client reported
    _sent: dict[int, _Sent] = field(default_factory=dict)
    _round: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        profiles = {self.population.profile_of(pid) for pid in range(int(self.run["clients"]))}
        if self.rule not in HETERO_RANK_RULES:
            ranks = {p.lora_rank for p in profiles}
            if ranks - {0, int(self.run["lora-rank"])}:
                log.warning("profile LoRA ranks %s ignored: smaller ranks need aggregation 'hetlora' or 'flora'", sorted(ranks - {0}))
        if self.rule in BASE_RULES:  # their update lands in the frozen base weights of an fp32 backbone
            unfit = sorted(p.name for p in profiles if p.quantized or not p.holds_backbone)
            if unfit:
                raise ValueError(f"aggregation {self.rule!r} updates the frozen base weights: profile {unfit[0]!r} is quantized or holds no backbone")

    # ----------------------------------------------------------------------------- configure
    def plan_round(self, server_round: int, messages: list[Message], arrays: ArrayRecord, grid: Any) -> list[Message]:
        """One message per sampled client that is reachable, each with its own package."""
        self._learn_partitions([m.metadata.dst_node_id for m in messages], grid)
        current = from_array_record(arrays)
        num_values = sum(int(v.size) for k, v in current.items() if not k.startswith(BASE_PREFIX))  # what a client uploads
        record_at = self.records_by_rank(current, arrays)
        base_config = messages[0].content["config"] if messages else ConfigRecord()
        self._sent, out = {}, []
        events: dict[str, list[int]] = {"unavailable": [], "dropped": []}
        profiles: Counter[str] = Counter()
        download = 0
        for msg in messages:
            node = msg.metadata.dst_node_id
            pid = self._partition.get(node, -1)
            profile = self.profile_for(node)
            name = pid if pid >= 0 else node
            event = self.population.event(server_round, pid) if pid >= 0 else "train"
            if event == "unavailable":
                events["unavailable"].append(name)
                continue
            package = plan_package(profile, self.run, num_values, self.population.upload_seconds, self.backbone_gb, self.rule)
            record = record_at(package.lora_rank)
            nbytes = sum(len(a.data) for a in record.values())
            download += nbytes
            if event == "dropout":  # received the package, never answers
                events["dropped"].append(name)
                continue
            config = ConfigRecord({**dict(base_config), **package.overrides()})
            content = RecordDict({"arrays": record, "config": config})
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
            self._sent[node] = _Sent(pid, profile, package, nbytes)
            profiles[profile.name] += 1
        self._round = {**events, "stragglers": [], "profiles": dict(profiles), "download_bytes": download, "client_seconds": [], "waited_for_dropouts": bool(events["dropped"])}
        log.info(
            "round %d: %d sampled, %d unreachable, %d dropped out, %d training (%s)",
            server_round, len(messages), len(events["unavailable"]), len(events["dropped"]), len(out),
            ", ".join(f"{k} {v}" for k, v in sorted(profiles.items())),
        )
        return out

    def learn(self, nodes: Iterable[int], grid: Any) -> None:
        """Learn the partition id and profile of nodes not met yet (energy-aware selection sees all)."""
        self._learn_partitions(nodes, grid)

    def sent_to(self, node: int) -> tuple[DeviceProfile, int, bool] | None:
        """(profile, bytes sent, simulated?) of `node`'s package this round; None if it got none."""
        sent = self._sent.get(node)
        return None if sent is None else (sent.profile, sent.download_bytes, sent.partition_id >= 0)

    def partition_of(self, node: int) -> int:
        """The partition id `node` answered (-1: none, or not asked yet)."""
        return self._partition.get(node, -1)

    def profile_for(self, node: int) -> DeviceProfile:
        pid = self._partition.get(node, -1)
        if pid >= 0:
            return self.population.profile_of(pid)
        named = getattr(self.population, "profiles_by_name", {}).get(self._named.get(node, ""))
        return named or self._reported.get(node, DEFAULT_PROFILE)

    def _learn_partitions(self, nodes: Iterable[int], grid: Any) -> None:
        """Ask each node not seen before for its partition id and profile name (one query each)."""
        unknown = [n for n in nodes if n not in self._partition]
        if not unknown:
            return
        queries = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        for reply in grid.send_and_receive(queries, timeout=QUERY_TIMEOUT):
            node = reply.metadata.src_node_id
            answer, reason = read_query_answer(reply)  # checked: never raises on what a node answers
            if reason:
                log.warning("node %d did not say who it is (%s); default profile", node, reason)
            if answer.partition_id >= int(self.run["clients"]):
                log.warning("node %d answered partition id %d, outside the run's %s clients; default profile", node, answer.partition_id, self.run["clients"])
            self._partition[node] = answer.partition_id if answer.partition_id < int(self.run["clients"]) else -1
            self._named[node] = answer.profile
            if answer.memory_gb is not None:  # a deployed client describes its own device
                self._reported[node] = DeviceProfile(
                    answer.profile or f"node-{node}", memory_gb=answer.memory_gb, holds_backbone=answer.holds_backbone, quantized=answer.quantized,
                    accelerator=answer.accelerator, accelerator_memory_gb=answer.accelerator_memory_gb,
                ).validate()
        for node in unknown:
            self._partition.setdefault(node, -1)

    def records_by_rank(self, current: dict[str, np.ndarray], full: ArrayRecord | None = None) -> Callable[[int], ArrayRecord]:
        """rank -> `current` cut to that LoRA rank as an ArrayRecord, built once per rank (HetLoRA);
        `full` is the record of `current` itself, when the caller already has it."""
        cache: dict[int, ArrayRecord] = {} if full is None else {int(self.run["lora-rank"]): full}

        def record_at(rank: int) -> ArrayRecord:
            if rank not in cache:
                cache[rank] = to_array_record(current if rank == int(self.run["lora-rank"]) else truncate_to_rank(current, rank))
            return cache[rank]

        return record_at

    # ----------------------------------------------------------------------------- replies
    def rank_for(self, node: int) -> int:
        """The LoRA rank of the package `node` was sent this round (the run's rank if none)."""
        sent = self._sent.get(node)
        return sent.package.lora_rank if sent is not None else int(self.run["lora-rank"])

    def base_for(self, node: int, current: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """The arrays `node` was sent (the global truncated to its rank) and that rank."""
        rank = self.rank_for(node)
        return (current if rank == int(self.run["lora-rank"]) else truncate_to_rank(current, rank)), rank

    def restore(self, update: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
        """A rank-r update zero-padded back to the global rank (HetLoRA)."""
        return update if rank == int(self.run["lora-rank"]) else pad_to_rank(update, int(self.run["lora-rank"]))

    def check_reply(self, node: int, metrics: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """(straggler reason or None, fields for clients.jsonl) of one valid reply."""
        sent = self._sent.get(node)
        if sent is None:
            return None, {}
        seconds = simulated_seconds(sent.profile, float(metrics.get("train-seconds", 0.0)), float(metrics.get("upload-bytes", 0)), sent.download_bytes,
                                    float(metrics.get("train-gflops", 0.0)), float(self.run.get("simulated-gflops", 0.0)))
        package = sent.package
        entry = {"profile": package.profile, "package_kind": package.kind, "lora_rank": package.lora_rank, "quantize": package.quantize,
                 "upload_codec": package.upload_codec, "simulated_seconds": seconds}
        deadline = self.population.deadline
        if deadline and seconds > deadline:
            self._round["stragglers"].append(sent.partition_id if sent.partition_id >= 0 else node)
            return f"straggler: simulated {seconds:.1f} s > deadline {deadline:g} s", entry
        self._round["client_seconds"].append(seconds)
        return None, entry

    def round_record(self) -> dict[str, Any]:
        """Per-round fields for metrics.jsonl: simulated time, dropouts, stragglers, profiles."""
        record = dict(self._round)
        seconds = record.pop("client_seconds", [])
        waited = record.pop("waited_for_dropouts", False) or bool(record.get("stragglers"))
        deadline = self.population.deadline
        # the coordinator waits for its slowest client, or until the deadline for one that never comes
        record["simulated_seconds"] = deadline if (waited and deadline) else max(seconds, default=0.0)
        return record


def planner_for(config: Any, population: PopulationModel | None) -> Planner | None:
    """The planner of a run with a population model (handed over by the simulation's front door,
    simulations/server_app.py and simulations/runner.py); None without one."""
    if population is None:
        return None
    from finetune.cache import lora_model

    model, _ = lora_model(config.model, config.lora_settings(), config.seed, config.quantize, config.device, config.dtype)
    # the full-precision (fp32) size, whatever dtype the coordinator's own copy computes in
    backbone_gb = sum(p.numel() * (4 if p.is_floating_point() else p.element_size()) for p in model.parameters()) / 1e9
    counts = getattr(population, "counts", dict)()
    log.info("population: %s; deadline %s", ", ".join(f"{name} {count}" for name, count in counts.items()) or "reported by the clients",
             f"{population.deadline:g} s (simulated)" if population.deadline else "none")
    return Planner(population, config.to_flat(), config.aggregation, backbone_gb)
