"""Run configuration: one typed dataclass, settable from pyproject, a TOML file or the CLI.

Keys are kebab-case outside (Flower run config, TOML, `--local-steps`) and snake_case
inside. Unknown keys and values of the wrong type are one-line errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.choices import BASE_RULES, CHOICES, DEVICE_CHOICES, DISTILL_OBJECTIVES, one_of, valid_device_spec

if TYPE_CHECKING:  # torch and PEFT load only where LoRA is built, not for `fedsite --help`
    from finetune.lora import LoraSettings

DEFAULT_DISTILL_OBJECTIVE = DISTILL_OBJECTIVES[-1]
# other spellings of a field, accepted wherever a key is (CLI option, TOML key, run config)
ALIASES = {"rounds": "num-server-rounds"}
# Kill-and-Revive module selection (coordinator/module_selection.py) and its sensitivity scores
MODULE_SELECTIONS = CHOICES["module-selection"]
KR_SCORES = CHOICES["kr-score"]
KR_ASSIGNS = CHOICES["kr-assign"]
KR_PRIORS = CHOICES["kr-prior"]
KR_UNSUPPORTED_RULES = ("hetlora", "flora", "fedex-lora")  # per-client ranks or base-weight folds of every module
EMULATOR_FILLS, EMULATOR_SELECTS = CHOICES["emulator-fill"], CHOICES["emulator-select"]  # an emulator's dropped middle blocks (emulator/layers.py)


class ConfigError(ValueError):
    """A configuration value or key that is wrong; the message names it."""


@dataclass
class FedsiteConfig:
    # backbone: "smollm2" (embedded, default), "tiny" (random Llama for tests) or a model folder
    model: str = "smollm2"
    # LoRA modules sent to clients
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,v_proj"
    # data: "builtin" (generated task suite), a .jsonl file or a `datasets` folder
    data: str = "builtin"
    train_per_task: int = 200
    test_per_task: int = 20
    test_fraction: float = 0.1
    partitioning: str = "iid"  # iid | dirichlet | shards
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    partition_size_sigma: float = 0.0  # iid quantity skew: lognormal sigma of per-client data sizes; 0 = equal
    max_seq_len: int = 128
    seed: int = 0
    # federation
    clients: int = 4
    num_server_rounds: int = 3
    fraction_train: float = 1.0
    min_train_clients: int = 2
    fraction_evaluate: float = 0.0
    round_timeout: float = 3600.0
    # who trains: Flower's uniform sample, or energy-aware (coordinator/selection.py) within a fairness bound
    client_selection: str = "uniform"  # uniform | energy-aware
    selection_fairness_rounds: int = 5  # energy-aware: every client is selected at least once every this many rounds
    selection_battery_threshold: float = 0.3  # energy-aware: prefer batteries above this fraction of capacity
    selection_objective: str = "carbon"  # energy-aware: then minimise expected gCO2e ("carbon") or joules ("energy")
    selection_fairness_weight: float = 1.5  # energy-aware: expected cost x (1 + times selected)^this (0 = pure greedy; 1.5 measured fairer at the same energy)
    # simulated compute time (energy, stragglers): > 0 = counted training GFLOPs over this many GFLOP/s x the
    # profile's speed, the same under any machine load; 0 = this machine's measured seconds over the speed
    simulated_gflops: float = 0.0
    # aggregation rule (see aggregation/rules.py) and its knobs
    aggregation: str = "fedavg"
    server_lr: float = 0.01
    server_momentum: float = 0.9
    trim_fraction: float = 0.1
    proximal_mu: float = 0.01
    # norm bound on each update's L2 distance from the global: < 0 = adaptive (max-update-norm-multiple
    # x the round's reference norm, see aggregation/bounds.py), 0 = off (no norm bound at all), > 0 = this absolute bound
    max_update_norm: float = -1.0
    max_update_norm_multiple: float = 5.0  # adaptive bound: reject updates beyond this multiple of the round's median norm
    max_update_mb: float = 0.0  # reject updates larger than this; 0 = off
    max_client_examples: int = 100000  # cap on a client's reported example count (its weight); 0 = no cap
    max_weight_share: float = 0.0  # cap on one client's share of the aggregation weights (excess redistributed); 0 = off
    # local training on each client
    local_steps: int = 10
    local_epochs: int = 0  # > 0: train whole epochs instead of `local_steps`
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # upload: codec for the client's delta, optional top-k sparsification and error feedback
    upload_codec: str = "fp32"  # fp32 | fp16 | int8 | 4bit | adaptive (per module by norm share, protos/adaptive.py)
    upload_budget_mb: float = 0.0  # adaptive codec: most MB a client's upload may take; 0 = no budget
    upload_topk: float = 0.0  # keep this fraction of largest entries per tensor; 0 = dense
    error_feedback: bool = False
    # DLoRA Kill-and-Revive: clients train and send only the round's active LoRA modules
    module_selection: str = "all"  # all | kill-revive
    kr_active_share: float = 0.5  # share of the LoRA modules active each round
    kr_score: str = "update-norm"  # a module's sensitivity: update-norm | update-rms of its aggregated update | gradient (clients' first-step gradient norms)
    kr_revive_every: int = 3  # every n-th round half the active slots go to the longest-killed modules; 0 = never
    kr_lowest_block: int = 0  # modules in blocks below this stay killed (never trained or revived): backward stops there
    kr_assign: str = "shared"  # shared (one selection per round, SecAgg+-safe) | per-client (each client its own, from its own updates)
    kr_prior: str = "none"  # per-client: none (a client tries its unscored modules in a seeded order) | federation (ranks them by the other clients' scores)
    # privacy: "none", "local" (DP-SGD on clients, Opacus) or "client" (user-level DP at the coordinator)
    dp: str = "none"
    noise_multiplier: float = 1.0
    target_epsilon: float = 0.0  # local DP: calibrate the noise to this epsilon over the run; 0 = use noise-multiplier
    delta: float = 1e-5
    dp_max_grad_norm: float = 1.0  # local DP: per-sample gradient clipping
    epsilon_budget: float = 0.0  # local DP: clients decline to train once they spent this; 0 = target-epsilon or none
    dp_clip_norm: float = 0.1  # client DP: bound on each client's update (L2 distance from the global)
    dp_adaptive_clip: bool = False  # client DP: clip bound follows the median update norm
    # secure aggregation (Flower's SecAgg+): the coordinator only sees the sum of masked updates
    secure: bool = False
    secure_num_shares: float = 1.0  # neighbours each client secret-shares its keys with: share of sampled clients (<= 1) or a count
    secure_threshold: float = 0.6  # shares needed to unmask: share of num-shares (<= 1) or a count
    secure_clip_range: float = 1.0  # arrays (times weight / max-weight) are clipped to [-r, r] before quantization
    secure_quantization_range: int = 4194304  # quantization levels (2^22); the mask modulus is 2^32
    secure_max_weight: float = 1000.0  # largest client weight (training examples); larger ones are capped
    # QLoRA-style clients: frozen backbone loaded in 4-bit NF4 or 8-bit (bitsandbytes)
    quantize: str = "none"
    # offsite tuning: clients without the backbone train an adapter against a signed emulator
    emulator_share: float = 0.0  # share of simulated clients that get the emulator instead of the backbone
    emulator_package: str = ""  # a package from `fedsite emulator build` ("" = build one into <out>/emulator)
    emulator_adapter_layers: int = 0  # trainable blocks kept at each end (0 = 2, or 1 below 8 blocks)
    emulator_stride: int = 2  # keep every n-th middle block
    emulator_keep: float = 0.8  # > 0: keep this share of the middle blocks, evenly spaced (FedBiOT's 0.8); 0: every emulator-stride-th
    emulator_fill: str = "drop"  # dropped middle blocks: "drop" (shallower) or "share" (depth kept, nearest kept block reused)
    emulator_select: str = "stride"  # kept middle blocks: every n-th ("stride") or one per run of similar blocks ("similarity", CRaSh)
    emulator_quantize: str = "int8"  # storage of the emulator's frozen middle: none, int8 or nf4 (int8: 0.46 of SmolLM2's bytes at keep 0.8)
    emulator_distill_steps: int = 100  # distillation steps of the kept middle toward the full model (benchmarks/offsite.py's setting)
    emulator_distill_objective: str = DEFAULT_DISTILL_OBJECTIVE  # logits (KL), hidden (MSE into the top adapter) or both
    emulator_distill_rank: int = 0  # > 0: distillation trains rank-r factors on the middle, folded in (a low-rank change); 0: every middle weight
    emulator_distill_data: str = ""  # examples to distil on (.jsonl or datasets folder; "" = built-in families, own seed)
    offsite_train: str = "lora"  # offsite clients train LoRA on the adapter blocks, or the "blocks" themselves
    # LoRA of offsite clients: every linear of the adapter blocks (LoRA on q/v of four blocks learns
    # little; on all seven it transferred best of what was tried on SmolLM2 and uploads ~22x less than blocks)
    offsite_lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    offsite_lr: float = 0.0  # learning rate of offsite clients (0 = `lr` for LoRA, 1e-4 for whole blocks)
    emulator_align_steps: int = 0  # per-round alignment steps of the emulator at the coordinator (FedBiOT; 0 = off), shipped as a signed low-rank refresh
    emulator_align_rank: int = 4  # rank of that refresh's LoRA factors on the frozen middle
    emulator_align_lr: float = 1e-3  # AdamW learning rate of those factors
    offsite_proximal_mu: float = 0.0  # offsite clients add lambda * ||adapter - round-start adapter||^2 (FedBiOT: 1; 0 = off)
    artifact_url: str = ""  # HOST:PORT of the coordinator's artifact service: emulators are published to <out>/artifacts and fetched by reference
    # evaluation
    eval_examples: int = 60
    client_eval_examples: int = 16
    max_new_tokens: int = 16
    # output folder for metrics, config snapshot and the exported adapter
    out: str = "results/run"
    # simulation engine
    workers: int = 2
    gpus_per_worker: float = 0.0  # GPU share of each simulation worker (0.25: four per GPU); 0 = auto (a CUDA device's GPUs shared by the workers, else none)
    ray_address: str = ""  # join this running Ray cluster (HOST:PORT or "auto"; "" = $RAY_ADDRESS, else a private Ray on this machine)
    # where models run (finetune/device.py): auto | cpu | cuda | cuda:N | mps; dtype of the frozen backbone: auto | fp32 | bf16 | fp16
    device: str = "auto"
    dtype: str = "auto"
    # experiment file whose [population] and [[profiles]] decide packages, dropouts and deadlines ("" = none)
    experiment: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def lora_settings(self, targets: str | None = None) -> LoraSettings:
        """The run's LoRA; `targets` (comma-separated) overrides `lora-targets`."""
        from finetune.lora import LoraSettings

        names = module_names(self.lora_targets if targets is None else targets)
        return LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=names)

    def offsite_lora_settings(self) -> LoraSettings:
        """LoRA of offsite clients on the adapter blocks (rank and alpha of the run, own targets)."""
        return self.lora_settings(self.offsite_lora_targets)

    def client_lr(self, offsite_mode: str | None = None) -> float:
        """A client's learning rate: `lr`, or `offsite-lr` for offsite clients (whole adapter
        blocks diverge at a LoRA learning rate, so their default is 1e-4)."""
        if offsite_mode is None:
            return self.lr
        return self.offsite_lr or (1e-4 if offsite_mode == "blocks" else self.lr)

    def client_proximal_mu(self, offsite_mode: str | None = None) -> float:
        """The mu of a client's proximal term mu/2 ||w - w_start||^2 (finetune/train.py): FedProx's
        `proximal-mu` under fedprox; offsite clients with `offsite-proximal-mu` = lambda > 0 get
        mu = 2 lambda, i.e. FedBiOT's lambda ||adapter - round-start adapter||^2, whatever the rule."""
        if offsite_mode is not None and self.offsite_proximal_mu > 0:
            return 2.0 * self.offsite_proximal_mu
        return self.proximal_mu if self.aggregation == "fedprox" else 0.0

    def to_flat(self) -> dict[str, Any]:
        """Kebab-case keys and plain values, as Flower's run config and ConfigRecord want them."""
        return {_kebab(f.name): getattr(self, f.name) for f in _public_fields()}

    def replace(self, **changes: Any) -> FedsiteConfig:
        return dataclasses.replace(self, **changes)

    def validate(self, labels: Mapping[str, str] | None = None) -> FedsiteConfig:
        """Raise a one-line ConfigError on the first wrong value; `labels` (kebab key -> the name
        the user wrote, e.g. "--rounds") make the message name the option as it was given."""
        from aggregation.rules import RULES

        checks = [
            ("aggregation", self.aggregation in RULES, "one of " + ", ".join(RULES)),
            ("trim-fraction", 0.0 <= self.trim_fraction < 0.5, "in [0, 0.5)"),
            ("proximal-mu", self.proximal_mu >= 0.0, "non-negative"),
            ("max-update-norm", math.isfinite(self.max_update_norm), "a finite number (< 0 adaptive, 0 off, > 0 an absolute bound)"),
            ("max-update-norm-multiple", self.max_update_norm_multiple >= 1.0, "at least 1 (the reference update itself must pass)"),
            ("max-update-mb", self.max_update_mb >= 0.0, "non-negative (0 = off)"),
            ("max-client-examples", self.max_client_examples >= 0, "non-negative (0 = no cap)"),
            ("max-weight-share", 0.0 <= self.max_weight_share <= 1.0, "in [0, 1] (0 = off)"),
            ("lora-rank", self.lora_rank >= 1, "a positive integer"),
            ("clients", self.clients >= 1, "at least 1"),
            ("num-server-rounds", self.num_server_rounds >= 1, "at least 1"),
            ("fraction-train", 0.0 < self.fraction_train <= 1.0, "in (0, 1]"),
            ("fraction-evaluate", 0.0 <= self.fraction_evaluate <= 1.0, "in [0, 1]"),
            ("local-steps", self.local_steps >= 1 or self.local_epochs >= 1, "at least 1"),
            ("batch-size", self.batch_size >= 1, "at least 1"),
            ("lr", self.lr > 0, "positive"),
            ("partitioning", self.partitioning in CHOICES["partitioning"], one_of(CHOICES["partitioning"])),
            ("dirichlet-alpha", self.dirichlet_alpha > 0, "positive"),
            ("partition-size-sigma", self.partition_size_sigma == 0 or (self.partition_size_sigma > 0 and self.partitioning == "iid"), "0, or positive with partitioning 'iid'"),
            ("test-fraction", 0.0 < self.test_fraction < 1.0, "in (0, 1)"),
            ("workers", self.workers >= 1, "at least 1"),
            ("gpus-per-worker", math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0, "a finite number >= 0 (0 = auto)"),
            ("ray-address", "\n" not in self.ray_address and self.ray_address == self.ray_address.strip(), "HOST:PORT, 'auto' or '' (one line)"),
            ("device", valid_device_spec(self.device), DEVICE_CHOICES),
            ("dtype", self.dtype in CHOICES["dtype"], ", ".join(CHOICES["dtype"])),
            ("upload-codec", self.upload_codec in CHOICES["upload-codec"], one_of(CHOICES["upload-codec"])),
            ("upload-budget-mb", math.isfinite(self.upload_budget_mb) and self.upload_budget_mb >= 0, "a finite number >= 0 (0 = no budget)"),
            ("upload-topk", self.upload_topk == 0.0 or self.upload_codec != "adaptive", "0 with upload-codec 'adaptive' (it sends every module, each at its own precision)"),
            ("client-selection", self.client_selection in CHOICES["client-selection"], one_of(CHOICES["client-selection"])),
            ("selection-fairness-rounds", self.selection_fairness_rounds >= 1, "at least 1"),
            ("selection-battery-threshold", 0.0 <= self.selection_battery_threshold <= 1.0, "in [0, 1]"),
            ("selection-objective", self.selection_objective in CHOICES["selection-objective"], one_of(CHOICES["selection-objective"])),
            ("selection-fairness-weight", 0.0 <= self.selection_fairness_weight <= 10.0, "in [0, 10]"),
            ("simulated-gflops", math.isfinite(self.simulated_gflops) and self.simulated_gflops >= 0, "a finite number >= 0 (0 = measured seconds)"),
            ("upload-topk", 0.0 <= self.upload_topk <= 1.0, "in [0, 1]"),
            ("dp", self.dp in CHOICES["dp"], one_of(CHOICES["dp"])),
            ("noise-multiplier", self.noise_multiplier >= 0.0, "non-negative"),
            ("delta", 0.0 < self.delta < 1.0, "in (0, 1)"),
            ("dp-clip-norm", self.dp_clip_norm > 0.0, "positive"),
            ("dp-max-grad-norm", self.dp_max_grad_norm > 0.0, "positive"),
            ("quantize", self.quantize in CHOICES["quantize"], one_of(CHOICES["quantize"])),
            ("emulator-share", 0.0 <= self.emulator_share <= 1.0, "in [0, 1]"),
            ("emulator-adapter-layers", self.emulator_adapter_layers >= 0, "non-negative (0 = default)"),
            ("emulator-stride", self.emulator_stride >= 1, "at least 1"),
            ("emulator-keep", 0.0 <= self.emulator_keep <= 1.0, "in [0, 1] (0 = every --emulator-stride-th block)"),
            ("emulator-fill", self.emulator_fill in EMULATOR_FILLS, one_of(EMULATOR_FILLS)),
            ("emulator-select", self.emulator_select in EMULATOR_SELECTS, one_of(EMULATOR_SELECTS)),
            ("emulator-quantize", self.emulator_quantize in CHOICES["emulator-quantize"], one_of(CHOICES["emulator-quantize"])),
            ("emulator-distill-steps", self.emulator_distill_steps >= 0, "non-negative"),
            ("emulator-distill-rank", self.emulator_distill_rank >= 0, "non-negative (0 = every middle weight)"),
            ("offsite-train", self.offsite_train in CHOICES["offsite-train"], one_of(CHOICES["offsite-train"])),
            ("offsite-lr", self.offsite_lr >= 0, "non-negative (0 = default)"),
            ("offsite-proximal-mu", self.offsite_proximal_mu >= 0, "non-negative (0 = off)"),
            ("emulator-align-steps", self.emulator_align_steps >= 0, "non-negative (0 = off)"),
            ("emulator-align-rank", self.emulator_align_rank >= 1, "at least 1"),
            ("emulator-align-lr", self.emulator_align_lr > 0, "positive"),
            ("offsite-lora-targets", bool(module_names(self.offsite_lora_targets)), "at least one module name"),
            ("emulator-distill-objective", self.emulator_distill_objective in DISTILL_OBJECTIVES, one_of(DISTILL_OBJECTIVES)),
            ("aggregation", self.dp != "client" or self.aggregation == "fedavg", "fedavg with dp 'client' (DP-FedAvg)"),
            # fedex-lora / flora fold updates into the frozen base weights (finetune/base_delta.py)
            ("quantize", self.quantize == "none" or self.aggregation not in BASE_RULES, f"none with aggregation {self.aggregation!r} (it updates the frozen base weights)"),
            ("emulator-share", self.emulator_share == 0.0 or self.aggregation not in BASE_RULES, f"0 with aggregation {self.aggregation!r} (emulator clients cannot take base-weight updates)"),
            *self._secure_checks(RULES),
            *self._selection_checks(),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{label(key, labels)} = {getattr(self, _snake(key))!r} must be {expected}")
        return self

    def _selection_checks(self) -> list[tuple[str, bool, str]]:
        """Kill-and-Revive's knobs, and what it cannot be combined with."""
        kr = self.module_selection == "kill-revive"
        return [
            ("module-selection", self.module_selection in MODULE_SELECTIONS, " or ".join(MODULE_SELECTIONS)),
            ("kr-active-share", 0.0 < self.kr_active_share <= 1.0, "in (0, 1]"),
            ("kr-score", self.kr_score in KR_SCORES, " or ".join(KR_SCORES)),
            ("kr-score", not kr or self.kr_score != "gradient" or (self.dp == "none" and not self.secure),
             "not gradient with DP or secure aggregation (each client's gradient norms would reach the coordinator unprotected)"),
            ("kr-revive-every", self.kr_revive_every >= 0, "non-negative (0 = never revive)"),
            ("kr-lowest-block", self.kr_lowest_block >= 0, "a non-negative block index"),
            ("kr-assign", self.kr_assign in KR_ASSIGNS, " or ".join(KR_ASSIGNS)),
            ("kr-prior", self.kr_prior in KR_PRIORS, " or ".join(KR_PRIORS)),
            ("kr-prior", self.kr_prior == "none" or self.kr_assign == "per-client", "none unless kr-assign is per-client (a shared selection is scored by the federation already)"),
            ("kr-assign", not kr or self.kr_assign == "shared" or not self.secure, "shared with secure aggregation (masked vectors must line up)"),
            ("kr-assign", not kr or self.kr_assign == "shared" or (self.aggregation in ("fedavg", "fedprox") and self.dp != "client"),
             "shared unless aggregation is fedavg or fedprox without client-level DP (only those average each module over the clients that sent it)"),
            ("aggregation", not kr or self.aggregation not in KR_UNSUPPORTED_RULES, f"not {', '.join(KR_UNSUPPORTED_RULES)} with module-selection 'kill-revive'"),
            ("emulator-share", not kr or self.emulator_share == 0.0, "0 with module-selection 'kill-revive' (offsite clients train their own adapter)"),
        ]

    def _secure_checks(self, rules: Mapping[str, Any]) -> list[tuple[str, bool, str]]:
        """With `secure` on the coordinator sees only the sum: refuse what needs individual updates."""
        if not self.secure:
            return []
        sums = ", ".join(name for name, spec in rules.items() if spec.secure_compatible)
        shares, threshold = self.secure_num_shares, self.secure_threshold
        return [
            ("aggregation", getattr(rules.get(self.aggregation), "secure_compatible", False), f"a rule that needs only the sum of updates with secure aggregation ({sums})"),
            ("upload-codec", self.upload_codec == "fp32", "fp32 with secure aggregation (SecAgg+ quantizes the update itself)"),
            ("upload-topk", self.upload_topk == 0.0, "0 with secure aggregation (masked updates are dense)"),
            ("client-selection", self.client_selection == "uniform", "uniform with secure aggregation (SecAgg+ samples on Flower's legacy path)"),
            ("error-feedback", not self.error_feedback, "false with secure aggregation (no upload codec to feed back)"),
            ("dp-adaptive-clip", not (self.dp == "client" and self.dp_adaptive_clip), "false with secure aggregation (the coordinator cannot see which updates were clipped)"),
            ("clients", self.clients >= 2, "at least 2 with secure aggregation"),
            # per-client packages (population profiles, offsite emulators) are planned on the Message-API path only
            ("experiment", not getattr(self, "experiment", ""), "'' with secure aggregation (population planning is not on the SecAgg+ path yet)"),
            ("emulator-share", not getattr(self, "emulator_share", 0.0), "0 with secure aggregation (offsite clients are not on the SecAgg+ path yet)"),
            ("secure-num-shares", 0 < shares <= 1 or (shares >= 3 and float(shares).is_integer()), "a share in (0, 1] or a whole count >= 3"),
            ("secure-threshold", 0 < threshold <= 1 or (float(threshold).is_integer() and (shares <= 1 or threshold < shares)), "a share in (0, 1] or a whole count below secure-num-shares"),
            ("secure-clip-range", self.secure_clip_range > 0, "positive"),
            ("secure-quantization-range", 2 <= self.secure_quantization_range < 2**32, "in [2, 2^32)"),
            ("secure-max-weight", self.secure_max_weight > 0, "positive"),
        ]


def module_names(targets: str) -> tuple[str, ...]:
    """'q_proj, v_proj' -> ('q_proj', 'v_proj')."""
    return tuple(t.strip() for t in targets.split(",") if t.strip())


def label(key: str, labels: Mapping[str, str] | None = None) -> str:
    """How an error names field `key`: as the user wrote it if known, else as a config field."""
    return (labels or {}).get(key) or f"config field '{key}'"


def field_key(raw_key: str) -> str:
    """The kebab field key of a key as written: `--rounds`, `rounds`, `num_server_rounds` -> num-server-rounds."""
    key = _kebab(str(raw_key).lstrip("-"))
    return ALIASES.get(key, key)


def _public_fields() -> list[dataclasses.Field]:
    return [f for f in fields(FedsiteConfig) if f.name != "extra"]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _snake(name: str) -> str:
    return name.replace("-", "_")


def _coerce(name: str, value: Any, default: Any, labels: Mapping[str, str] | None = None) -> Any:
    kind = type(default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{label(_kebab(name), labels)} = {value!r} is not a valid {kind.__name__}") from None


def from_mapping(values: Mapping[str, Any], base: FedsiteConfig | None = None, labels: Mapping[str, str] | None = None) -> FedsiteConfig:
    """Build a config from kebab- or snake-case keys or their aliases (`rounds`); unknown keys
    are rejected. Errors name a key by `labels[raw key]` if given (e.g. "--rounds"), else as written."""
    config = dataclasses.replace(base) if base is not None else FedsiteConfig()
    known = {f.name: f for f in _public_fields()}
    spelled: dict[str, str] = {}
    for raw_key, value in values.items():
        key = field_key(raw_key)
        if _snake(key) not in known:
            raise ConfigError(f"unknown config field '{raw_key}' (see `fedsite simulate --help` for the fields)")
        spelled[key] = (labels or {}).get(raw_key) or f"config field '{raw_key}'"
        setattr(config, _snake(key), _coerce(_snake(key), value, getattr(FedsiteConfig(), _snake(key)), spelled))
    return config.validate(spelled)


def load_toml(path: str | Path, base: FedsiteConfig | None = None) -> FedsiteConfig:
    """Read a TOML experiment file whose top-level keys are config fields."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file '{path}': invalid TOML: {err}") from None
    return from_mapping(values, base)


def field_names() -> dict[str, list[str]]:
    """kebab field key -> every key accepted for it: the field's own name, then its aliases."""
    names = {_kebab(f.name): [_kebab(f.name)] for f in _public_fields()}
    for alias, key in ALIASES.items():
        names[key].append(alias)
    return names


def field_help() -> dict[str, tuple[Any, str]]:
    """kebab key -> (default, type name), for building CLI options from the dataclass."""
    defaults = FedsiteConfig()
    return {_kebab(f.name): (getattr(defaults, f.name), type(getattr(defaults, f.name)).__name__) for f in _public_fields()}
