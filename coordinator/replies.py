"""One checked decoding step for every client reply: train, evaluate and query.

A reply is client content: anything in it may be missing, of the wrong type, out of range or
built to make the coordinator allocate, crash or be captured. Each reader here turns a Flower
`Message` into a typed, bounded result or a `Rejected` with a one-line reason, and never
raises on what a client sent:

- metrics follow a schema (`TRAIN_METRICS`, `EVAL_METRICS`): each known key has a type and a
  finite range; lists, bools, NaN/Inf and out-of-range values are refused with the key named;
  unknown keys are dropped (counted), so no metric can overwrite a record field; `client-id`
  is dropped too: records name a client by its Flower node id, or the partition id the
  coordinator learned for that node (`coordinator.directory`), never by what a reply says;
- the local-DP metrics (`dp-*`) come all together or the reply is refused;
- the one list metric, Kill-and-Revive's `kr-grad-norms`, is read only where the run asks
  for it (`grad_len`): exactly one finite, non-negative number per LoRA module;
- arrays are read with a byte budget from the global arrays' shapes and `max-update-mb`
  (`payload_budget`) before anything is allocated (`protos.tensors`), decoded with the shapes
  the client was sent (`protos.updates`), then validated (`aggregation.validate`);
- a `declined` reply is a rejection with the client's reason made one line and truncated,
  or "declined (no reason given)".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message

from aggregation.validate import global_l2_norm, validate_update
from protos.codecs import CodecError
from protos.profile import ACCELERATORS
from protos.selection import GRAD_NORMS_KEY
from protos.tensors import TensorError, from_array_record
from protos.updates import decode_update

REASON_CHARS = 300  # a rejection reason, one line
CLIENT_TEXT_CHARS = 200  # client-written text inside a reason (declined, error)
MAX_COUNT = 2**53  # counts beyond this are not exact floats: refused (plausible ones are capped later)
MAX_SCALAR = 1e12  # losses and seconds: finite, and far from float overflow when weighted and summed

Metrics = dict[str, int | float]


def one_line(text: object, limit: int = REASON_CHARS) -> str:
    """`text` as one printable line of at most `limit` characters (line separators of any kind,
    control characters and runs of spaces become one space)."""
    raw = text if isinstance(text, str) else repr(text)
    raw = raw[: limit * 4]
    cleaned = " ".join("".join(c if c.isprintable() else " " for c in raw).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def shown(value: object) -> str:
    """A client value inside a reason: its repr, one line, short."""
    return one_line(repr(value), 40)


def error_text(reason: object) -> str | None:
    """The gist of an error reason a reply carries, one line: a traceback's last line (the
    exception and its message); None when there is no text."""
    if not isinstance(reason, str) or not reason.strip():
        return None
    lines = [line for line in reason[-CLIENT_TEXT_CHARS * 8 :].splitlines() if line.strip()]
    return one_line(lines[-1] if lines else reason, CLIENT_TEXT_CHARS)


@dataclass(frozen=True)
class Metric:
    """A metric's type and range: `integral` ones must be whole numbers; bounds are inclusive
    unless `open_low`/`open_high`; `inf` allows +/-Inf (never NaN)."""

    integral: bool = False
    low: float | None = 0.0
    high: float | None = MAX_SCALAR
    open_low: bool = False
    open_high: bool = False
    inf: bool = False


COUNT = Metric(integral=True, high=MAX_COUNT)
SCALAR = Metric()
MAX_NOISE = 100.0  # far above any run's; accounting larger ones costs the RDP series seconds
DP_METRICS = {
    "dp-noise-multiplier": Metric(high=MAX_NOISE),
    "dp-sample-rate": Metric(high=1.0),
    "dp-steps": COUNT,
    "dp-total-steps": COUNT,
    "dp-delta": Metric(high=1.0, open_low=True, open_high=True),
    # any sign, even Inf: never trusted, recomputed by the ledger and marked when it differs
    "dp-epsilon": Metric(low=None, high=None, inf=True),
}
TRAIN_METRICS = {
    "num-examples": COUNT,
    "train-loss": SCALAR,
    "train-loss-final": SCALAR,
    "steps": COUNT,
    "train-seconds": SCALAR,
    "train-gflops": SCALAR,  # counted training GFLOPs (finetune/flops.py); simulated compute time with simulated-gflops
    "upload-bytes": COUNT,
    "secure-weight": SCALAR,
    **DP_METRICS,
}
EVAL_METRICS = {"num-examples": COUNT, "eval-loss": SCALAR, "eval-accuracy": Metric(high=1.0), "eval-seconds": SCALAR}
DROPPED_KEYS = frozenset({"client-id"})  # clients name themselves; records never use it
VECTOR_KEYS = frozenset({GRAD_NORMS_KEY})  # list metrics: read by `read_vector`, never into `Metrics`


def _check(key: str, value: object, spec: Metric) -> tuple[int | float | None, str | None]:
    """(value as int/float, None) or (None, reason)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "a list" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
        return None, f"metric {key}: {what}, expected a number"
    number = float(value) if isinstance(value, float) else value
    if isinstance(number, float) and math.isnan(number):
        return None, f"metric {key}: NaN"
    if isinstance(number, float) and math.isinf(number) and not spec.inf:
        return None, f"metric {key}: {number}, expected a finite number"
    if spec.integral:
        if isinstance(number, float) and not number.is_integer():
            return None, f"metric {key}: {number!r}, expected a whole number"
        if abs(number) > MAX_COUNT:
            return None, f"metric {key}: {shown(number)} is beyond {MAX_COUNT}"
        number = int(number)
    elif isinstance(number, int):
        try:
            number = float(number)
        except OverflowError:
            return None, f"metric {key}: an integer beyond float range"
    low_ok = spec.low is None or (number > spec.low if spec.open_low else number >= spec.low)
    high_ok = spec.high is None or (number < spec.high if spec.open_high else number <= spec.high)
    if not (low_ok and high_ok):
        lo = "-inf" if spec.low is None else f"{spec.low:g}"
        hi = "inf" if spec.high is None else f"{spec.high:g}"
        interval = ("(" if spec.open_low else "[") + f"{lo}, {hi}" + (")" if spec.open_high else "]")
        return None, f"metric {key}: {shown(number)} is outside {interval}"
    return number, None


def read_metrics(record: object, schema: Mapping[str, Metric], required: tuple[str, ...] = ()) -> tuple[Metrics, int, str | None]:
    """(known metrics, number of unknown keys dropped, reason or None) of a metric record."""
    if not isinstance(record, Mapping):
        return {}, 0, f"metrics are a {type(record).__name__}, expected a metric record"
    metrics: Metrics = {}
    dropped = 0
    for key, value in record.items():
        if not isinstance(key, str) or key not in schema:
            dropped += key not in DROPPED_KEYS | VECTOR_KEYS
            continue
        number, reason = _check(key, value, schema[key])
        if reason is not None:
            return metrics, dropped, reason
        metrics[key] = number  # type: ignore[assignment]
    missing = [key for key in required if key not in metrics]
    if missing:
        return metrics, dropped, f"missing metric {missing[0]}"
    return metrics, dropped, None


def read_vector(record: Mapping, key: str, length: int) -> tuple[tuple[float, ...], str | None]:
    """((values...), None) for a list metric of exactly `length` finite numbers in [0, MAX_SCALAR]
    (empty when absent), or ((), reason)."""
    value = record.get(key)
    if value is None:
        return (), None
    if not isinstance(value, (list, tuple)):
        return (), f"metric {key}: a {type(value).__name__}, expected a list of numbers"
    if len(value) != length:
        return (), f"metric {key}: {len(value)} values, expected {length} (one per LoRA module)"
    out = []
    for item in value:
        number, reason = _check(key, item, SCALAR)
        if reason is not None:
            return (), reason
        out.append(float(number))  # type: ignore[arg-type]
    return tuple(out), None


@dataclass(frozen=True)
class DPReport:
    """What a local-DP client says it spent (epsilon cumulative over its rounds)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    total_steps: int
    delta: float
    epsilon: float


def read_dp(metrics: Metrics) -> tuple[DPReport | None, str | None]:
    """The dp-* group of already checked metrics: all of it, none of it, or a reason."""
    present = [key for key in DP_METRICS if key in metrics]
    if not present:
        return None, None
    missing = [key for key in DP_METRICS if key not in metrics]
    if missing:
        return None, f"incomplete DP metrics: missing {', '.join(missing)}"
    get = lambda name: metrics[f"dp-{name}"]  # noqa: E731
    report = DPReport(float(get("noise-multiplier")), float(get("sample-rate")), int(get("steps")), int(get("total-steps")), float(get("delta")), float(get("epsilon")))
    if report.total_steps < report.steps:
        return None, f"DP metrics: dp-total-steps {report.total_steps} < dp-steps {report.steps}"
    return report, None


@dataclass
class Rejected:
    """Why a reply is not used, with what could still be read of it (for the records)."""

    reason: str
    metrics: Metrics = field(default_factory=dict)
    dp: DPReport | None = None
    dropped: int = 0


@dataclass
class TrainReply:
    """A decoded, validated training reply: the trained arrays (base + delta) and its metrics."""

    update: dict[str, np.ndarray]
    metrics: Metrics
    examples: int  # as reported (> 0); capped by the strategy
    norm: float  # L2 norm of the delta from the arrays the client was sent
    dp: DPReport | None = None
    dropped: int = 0
    grad_norms: tuple[float, ...] = ()  # kr-score "gradient": one per LoRA module (sorted), empty if not sent


@dataclass
class EvalReply:
    examples: int  # as reported (> 0); capped by the strategy
    loss: float
    accuracy: float
    metrics: Metrics = field(default_factory=dict)


def error_reason(msg: Message) -> str | None:
    """Why a reply carries no usable content (an error, no content, a decline), or None."""
    if msg.has_error():
        text = error_text(getattr(msg.error, "reason", None))
        return f"client error: {text}" if text else "client error (no reason given)"
    if not msg.has_content():
        return "empty reply"
    content = msg.content
    if "declined" in content:
        record = content.config_records.get("declined")
        reason = record.get("reason") if record is not None else None
        return f"declined: {one_line(reason, CLIENT_TEXT_CHARS)}" if isinstance(reason, str) and reason.strip() else "declined (no reason given)"
    return None


def payload_budget(base: Mapping[str, np.ndarray], max_update_bytes: int | None = None) -> int:
    """Most bytes of arrays a reply to `base` may carry (checked before anything is allocated).

    The largest legal payload is fp32 top-k keeping every entry: 4 bytes of value and 4 of
    index per entry, plus per tensor its shape and (int8/4-bit) block scales, plus the header.
    `max-update-mb` lowers the bound (encoded uploads are at most the decoded size for dense
    codecs, plus the same small overhead).
    """
    values = sum(int(np.size(v)) for v in base.values())
    overhead = 256 * len(base) + 1024
    structural = 9 * values + overhead
    return min(structural, int(max_update_bytes) + overhead) if max_update_bytes else structural


def read_train_reply(msg: Message, base: Mapping[str, np.ndarray], *, max_update_bytes: int | None = None, max_norm: float | None = None,
                     grad_len: int = 0) -> TrainReply | Rejected:
    """The checked training reply to `base` (the arrays this client was sent), or why not.

    `max_update_bytes` bounds the payload and the decoded update; `max_norm`, when given, is an
    absolute bound on the delta's L2 norm (the round-relative bound is the strategy's);
    `grad_len` > 0 reads `kr-grad-norms`, if sent, as that many module norms.
    """
    reason = error_reason(msg)
    if reason is not None:
        return Rejected(reason)
    content = msg.content
    record = content.metric_records.get("metrics")
    if record is None:
        return Rejected("malformed reply: no 'metrics' metric record")
    metrics, dropped, reason = read_metrics(record, TRAIN_METRICS, required=("num-examples",))
    if reason is not None:
        return Rejected(reason, metrics, None, dropped)
    dp, reason = read_dp(metrics)
    if reason is not None:
        return Rejected(reason, metrics, None, dropped)
    if not metrics["num-examples"] > 0:
        return Rejected(f"num-examples must be positive, got {metrics['num-examples']}", metrics, dp, dropped)
    grads, reason = read_vector(record, GRAD_NORMS_KEY, grad_len) if grad_len else ((), None)
    if reason is not None:
        return Rejected(reason, metrics, dp, dropped)
    arrays = content.array_records.get("arrays")
    if arrays is None:
        return Rejected("malformed reply: no 'arrays' array record", metrics, dp, dropped)
    try:
        payload = from_array_record(arrays, max_bytes=payload_budget(base, max_update_bytes))
        update = decode_update(payload, base)
    except TensorError as err:
        return Rejected(f"unreadable arrays: {one_line(str(err))}", metrics, dp, dropped)
    except CodecError as err:
        return Rejected(f"undecodable update: {one_line(str(err))}", metrics, dp, dropped)
    del payload
    reason = validate_update(update, base, max_norm=max_norm, max_bytes=max_update_bytes or None, relative=True)
    if reason is not None:
        return Rejected(one_line(reason), metrics, dp, dropped)
    return TrainReply(update, metrics, int(metrics["num-examples"]), global_l2_norm(update, base), dp, dropped, grads)


def read_evaluate_reply(msg: Message) -> EvalReply | Rejected | None:
    """The checked evaluation reply, why not, or None when the client had nothing to evaluate."""
    reason = error_reason(msg)
    if reason is not None:
        return Rejected(reason)
    record = msg.content.metric_records.get("metrics")
    if record is None:
        return Rejected("malformed reply: no 'metrics' metric record")
    return read_evaluate_metrics(record)


def read_evaluate_metrics(record: object) -> EvalReply | Rejected | None:
    """An evaluation reply's metrics (also the secure path's `EvaluateRes.metrics`), checked."""
    metrics, dropped, reason = read_metrics(record, EVAL_METRICS, required=("num-examples",))
    if reason is not None:
        return Rejected(reason, metrics, None, dropped)
    if metrics["num-examples"] == 0:
        return None  # no test examples on this client
    for key in ("eval-loss", "eval-accuracy"):
        if key not in metrics:
            return Rejected(f"missing metric {key}", metrics, None, dropped)
    return EvalReply(int(metrics["num-examples"]), float(metrics["eval-loss"]), float(metrics["eval-accuracy"]), metrics)


@dataclass(frozen=True)
class QueryAnswer:
    """Who a node says it is: partition id (-1: none), profile name, and a deployed client's device."""

    partition_id: int = -1
    profile: str = ""
    memory_gb: float | None = None  # None: the node did not describe a device
    holds_backbone: bool = True
    quantized: bool = False
    accelerator: str = "none"  # none (CPU), cuda or mps; absent from older clients' answers
    accelerator_memory_gb: float = 0.0


MAX_PROFILE_CHARS = 64
MAX_MEMORY_GB = 1e6


def read_query_answer(msg: Message) -> tuple[QueryAnswer, str | None]:
    """The node's answer to the who-are-you query, or the default answer and why it was refused."""
    if msg.has_error():
        text = error_text(getattr(msg.error, "reason", None))
        return QueryAnswer(), f"query error: {text}" if text else "query error (no reason given)"
    info = msg.content.config_records.get("client") if msg.has_content() else None
    if info is None:
        return QueryAnswer(), "query answer has no 'client' config record"
    pid = info.get("partition-id", -1)
    if isinstance(pid, bool) or not isinstance(pid, int) or not -1 <= pid < 2**31:
        return QueryAnswer(), f"query answer: partition-id {shown(pid)} is not an int in [-1, 2^31)"
    profile = info.get("profile", "")
    if not isinstance(profile, str) or len(profile) > MAX_PROFILE_CHARS or one_line(profile, MAX_PROFILE_CHARS) != profile:
        return QueryAnswer(), f"query answer: profile {shown(profile)} is not a one-line name of at most {MAX_PROFILE_CHARS} characters"
    if "holds-backbone" not in info:
        return QueryAnswer(pid, profile), None
    flags = {key: info.get(key, default) for key, default in (("holds-backbone", True), ("quantized", False))}
    for key, value in flags.items():
        if not isinstance(value, bool):
            return QueryAnswer(pid, profile), f"query answer: {key} {shown(value)} is not a bool"
    memory = info.get("memory-gb", 0.0)
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not 0 <= memory <= MAX_MEMORY_GB:
        return QueryAnswer(pid, profile), f"query answer: memory-gb {shown(memory)} is not a number in [0, {MAX_MEMORY_GB:g}]"
    accelerator = info.get("accelerator", "none")
    if not isinstance(accelerator, str) or accelerator not in ACCELERATORS:
        return QueryAnswer(pid, profile), f"query answer: accelerator {shown(accelerator)} is not one of {', '.join(ACCELERATORS)}"
    accelerator_memory = info.get("accelerator-memory-gb", 0.0)
    if isinstance(accelerator_memory, bool) or not isinstance(accelerator_memory, (int, float)) or not 0 <= accelerator_memory <= MAX_MEMORY_GB:
        return QueryAnswer(pid, profile), f"query answer: accelerator-memory-gb {shown(accelerator_memory)} is not a number in [0, {MAX_MEMORY_GB:g}]"
    if accelerator == "none" and accelerator_memory:
        return QueryAnswer(pid, profile), f"query answer: accelerator-memory-gb {shown(accelerator_memory)} without an accelerator"
    return QueryAnswer(pid, profile, float(memory), flags["holds-backbone"], flags["quantized"], accelerator, float(accelerator_memory)), None


def record_fields(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Checked metrics as clients.jsonl fields (snake case); only schema keys ever get here."""
    return {key.replace("-", "_"): value for key, value in metrics.items()}
