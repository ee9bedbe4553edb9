"""The Fedsite client's handlers: thin Flower handlers around the kernel's training and evaluation.

`client/client_app.py` registers them with the ClientApp; they run in-process in a simulation
and in the device's warm worker (`client/worker.py`) when deployed, one code path for both.
Both read the run's configuration from the message (the coordinator decides what each client
does), the client's own data from its node config, and never send data back: only LoRA arrays
and metrics leave the client.
"""

from __future__ import annotations

import logging
import sys
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from client.offsite import DEVICE_NODE, PACKAGE_KEY, PUBLIC_KEY_KEY, REFRESH_ROUND_KEY, REFRESH_SIGNATURE_KEY, OffsiteSpec, apply_round_refresh, offsite_model, offsite_spec, split_refresh
from client.privacy_policy import DevicePolicy, PolicyRefusal
from client.selection import apply_selection, grad_norms_metric, probe_groups, selected_update
from client.state import LedgerError, load_ledger, load_state, save_ledger, save_state
from emulator.keys import PackageError
from emulator.offsite import get_offsite_arrays, set_offsite_arrays
from finetune.base_delta import set_global_arrays, split_base
from finetune.cache import lora_model
from finetune.config import FedsiteConfig, from_mapping
from finetune.device import DeviceError, accelerator_of, model_device, resolve_device
from finetune.logs import setup_logging
from finetune.evaluate import evaluate
from finetune.privacy import BudgetExhausted, DPSettings, check_budget, plan_round, train_private
from finetune.lora import get_lora_arrays, set_trainable_factors
from finetune.sources import client_splits
from finetune.examples import Example
from finetune.train import NoGradient, TrainResult, TrainSettings, train
from protos.codecs import CodecError, ErrorFeedback, encoded_nbytes
from protos.tensors import from_array_record, to_array_record
from protos.selection import ACTIVE_KEY, SelectionError
from protos.updates import encode_update

log = logging.getLogger("fedsite.client")

# Per-round instructions the coordinator adds to the run config in the ConfigRecord.
ROUND_KEY = "server-round"
FACTORS_KEY = "train-factors"
# The package's other decisions (rank, quantize, codec) are run-config fields the planner overrode;
# "emulator" clients train LoRA on the backbone until the emulator path takes them.
PACKAGE_KEYS = ("package-kind", "profile", PACKAGE_KEY, PUBLIC_KEY_KEY, REFRESH_SIGNATURE_KEY, REFRESH_ROUND_KEY)


def run_config_from(record: ConfigRecord) -> tuple[FedsiteConfig, int, str]:
    """Split the message's ConfigRecord into the run config, the round and the factors to train."""
    values = dict(record)
    server_round = int(values.pop(ROUND_KEY, 0))
    factors = str(values.pop(FACTORS_KEY, "AB"))
    values.pop(ACTIVE_KEY, None)  # Kill-and-Revive's selection: read (and checked) by `local_training`
    for key in PACKAGE_KEYS:  # labels of the coordinator's package (coordinator/planner.py)
        values.pop(key, None)
    return from_mapping(values), server_round, factors


DEVICE_KEY = "device"  # node config of a deployed client (`fedsite client --device`)


def client_device(config: FedsiteConfig, node_config: Mapping[str, Any]) -> str:
    """The device this client trains on: its own (`fedsite client --device`, node config
    `device`); a deployed client without one uses "auto", never the coordinator's device;
    a simulated client the run's `device`."""
    if node_config.get(DEVICE_KEY):
        return str(node_config[DEVICE_KEY])
    return "auto" if DEVICE_NODE in node_config else config.device


def client_label(context: Context) -> str:
    return str(context.node_config.get("partition-id", context.node_id))


def client_id(context: Context) -> int:
    """A simulated client's partition id; -1 for a deployed client (the coordinator uses its node id)."""
    return int(context.node_config.get("partition-id", -1))


def log_in_ray_worker() -> None:
    """In a simulation's Ray worker, send the client's progress lines to its stderr: Ray keeps
    each worker's stderr in the log folder of the node it runs on
    (`<temp-dir>/session_latest/logs/worker-*.err`) and echoes it at the driver, deduplicated.
    Elsewhere nothing changes: the CLI and the device's worker set up logging themselves."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and not logging.getLogger("fedsite").handlers:
        setup_logging()


def train_handler(msg: Message, context: Context) -> Message:
    """Load the global LoRA arrays, train locally, reply with the new arrays and metrics."""
    log_in_ray_worker()
    config, server_round, factors = run_config_from(msg.content["config"])
    received, refresh = split_refresh(from_array_record(msg.content["arrays"]))  # refresh: offsite clients only
    try:
        offsite = offsite_spec(msg.content["config"], context.node_config)
        selection = msg.content["config"].get(ACTIVE_KEY)
        trained, result, privacy = local_training(config, server_round, factors, received, context, offsite, selection, refresh)
    except (PackageError, SelectionError) as err:
        log.warning("client %s round %d: %s", client_label(context), server_round, err)
        return declined(msg, context, str(err))
    except (BudgetExhausted, PolicyRefusal, LedgerError, DeviceError) as err:  # DeviceError: a device this machine lacks
        log.info("client %s round %d: %s", client_label(context), server_round, err)
        return declined(msg, context, str(err))
    except NoGradient as err:  # training would change nothing, or corrupt the update: say so
        log.error("client %s round %d: %s", client_label(context), server_round, err)
        return declined(msg, context, str(err))
    try:
        payload = encode_upload(trained, split_base(received)[0], config, context)
    except CodecError as err:  # e.g. an upload budget below the update's smallest adaptive size
        log.warning("client %s round %d: %s", client_label(context), server_round, err)
        return declined(msg, context, str(err))
    metrics = MetricRecord(train_metrics(result, encoded_nbytes(payload), privacy, context))
    content = RecordDict({"arrays": to_array_record(payload), "metrics": metrics})
    return Message(content=content, reply_to=msg)


def local_training(
    config: FedsiteConfig, server_round: int, factors: str, received: dict, context: Context, offsite: OffsiteSpec | None = None,
    selection: object = None,
    refresh: dict | None = None,
) -> tuple[dict, TrainResult, dict[str, float]]:
    """Train the received LoRA arrays on this client's split: (trained arrays, result, dp-* metrics).

    Shared by the plain handler above and the secure one in `client/secure.py`; raises
    BudgetExhausted when a local-DP client has spent its budget. With `offsite`, the client
    trains the adapter of the coordinator's emulator instead of LoRA on the backbone. With a
    Kill-and-Revive `selection` (the message's `active-modules`) only those modules train and
    come back (SelectionError, before any training, if it does not fit the adapter).
    """
    device = client_device(config, context.node_config)
    if offsite is not None:
        model, tokenizer, layer_map = offsite_model(offsite, config.offsite_lora_settings(), config.seed, context.node_config)
        model.to(resolve_device(device))  # the cached emulator: moved once, a no-op afterwards
        apply_round_refresh(model, layer_map, offsite, refresh or {})  # PackageError: declined
        set_offsite_arrays(model, received, layer_map, offsite.mode)
    else:
        if refresh:
            raise PackageError("client: an emulator refresh sent to a client that trains on the backbone; declined")
        model, tokenizer = lora_model(config.model, config.lora_settings(), config.seed, config.quantize, device, config.dtype)
        set_global_arrays(model, received)  # LoRA arrays, and the base-weight update of fedex-lora / flora
    set_trainable_factors(model, factors)
    try:
        active = apply_selection(model, selection)
    except SelectionError:
        set_trainable_factors(model, "AB")
        raise
    train_examples, _ = client_splits(config, context.node_config)
    settings = TrainSettings(
        steps=config.local_steps,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.client_lr(offsite.mode if offsite is not None else None),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        max_seq_len=config.max_seq_len,
        proximal_mu=config.client_proximal_mu(offsite.mode if offsite is not None else None),
        # a different data order every round and client, reproducible from the run seed
        seed=zlib.crc32(f"{config.seed}/{server_round}/{client_label(context)}".encode()),
    )
    privacy: dict[str, float] = {}
    DevicePolicy.from_node_config(context.node_config).admit(config)  # PolicyRefusal: decline
    try:
        if config.dp == "local":
            result, privacy = train_locally_private(model, tokenizer, train_examples, settings, config, context)
        else:
            probe = probe_groups(model, factors, config.kr_lowest_block) if active is not None and offsite is None and config.kr_score == "gradient" else None
            result = train(model, tokenizer, train_examples, settings, probe=probe)
    finally:
        set_trainable_factors(model, "AB")  # the cached model is shared with the next client
    log.info("client %s round %d: %d steps, loss %.3f, %.1fs on %s", client_label(context), server_round, result.steps, result.final_loss, result.seconds, model_device(model))
    trained = get_offsite_arrays(model, layer_map, offsite.mode) if offsite is not None else get_lora_arrays(model)
    return selected_update(trained, active), result, privacy


def train_metrics(result: TrainResult, upload_bytes: int, privacy: dict[str, float], context: Context) -> dict:
    """The metrics a training reply carries, whichever layout the reply uses."""
    return {
        "num-examples": result.examples,
        "train-loss": result.loss,
        "train-loss-final": result.final_loss,
        "steps": result.steps,
        "train-seconds": result.seconds,
        "train-gflops": result.flops / 1e9,
        "upload-bytes": upload_bytes,
        "client-id": client_id(context),
        **grad_norms_metric(result.probe_norms),
        **privacy,
    }


FEEDBACK_KEY = "error-feedback"


def train_locally_private(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example], settings: TrainSettings, config: FedsiteConfig, context: Context
) -> tuple[TrainResult, dict[str, float]]:
    """DP-SGD through Opacus under the device's own policy; the accountant lives on the device's
    disk (client/state.py), written after every round, so a restart never forgets what was spent.

    The round message sets the noise (or a target epsilon) and the run's budget; the device's
    policy raises the noise floor, lowers delta and caps the cumulative epsilon: a round that
    asks for less privacy than the policy allows, or would overspend it, is declined before
    anything is trained (PolicyRefusal).
    """
    policy = DevicePolicy.from_node_config(context.node_config)
    dp = DPSettings(
        noise_multiplier=None if config.target_epsilon > 0 else config.noise_multiplier,
        target_epsilon=config.target_epsilon or None,
        delta=policy.delta_for(config.delta),
        max_grad_norm=config.dp_max_grad_norm,
    )
    state = load_ledger(context)
    check_budget(state, dp, config.epsilon_budget or None)
    planned = config.num_server_rounds * settings.num_steps(len(examples))
    plan = plan_round(state, dp, len(examples), settings, total_steps_budget=planned)
    policy.check(plan.noise_multiplier, plan.epsilon)
    result, spend, state = train_private(model, tokenizer, examples, settings, dp, state, total_steps_budget=planned)
    save_ledger(context, state)
    spent = spend.to_dict()
    metrics = {f"dp-{key.replace('_', '-')}": float(spent[key]) for key in ("noise_multiplier", "sample_rate", "steps", "total_steps", "delta", "epsilon")}
    return result, metrics


def declined(msg: Message, context: Context, reason: str) -> Message:
    """A reply that trains nothing and says why (the coordinator records it, never aggregates it)."""
    metrics = MetricRecord({"num-examples": 0, "client-id": client_id(context)})
    return Message(content=RecordDict({"declined": ConfigRecord({"reason": reason}), "metrics": metrics}), reply_to=msg)


def encode_upload(trained: dict, received: dict, config: FedsiteConfig, context: Context) -> dict:
    """Encode the delta with the run's codec; the error-feedback residual lives on the client's
    disk (client/state.py), not in Flower's in-memory node state."""
    feedback = ErrorFeedback(load_state(context, FEEDBACK_KEY)) if config.error_feedback else None
    payload = encode_update(trained, received, config.upload_codec, config.upload_topk or None, feedback, int(config.upload_budget_mb * 1e6))
    if feedback is not None:
        save_state(context, FEEDBACK_KEY, feedback.state_dict())
    return payload


def evaluate_handler(msg: Message, context: Context) -> Message:
    """Loss and exact-match accuracy of the global adapter on this client's test split."""
    config, _, _ = run_config_from(msg.content["config"])
    metrics = local_evaluation(config, from_array_record(msg.content["arrays"]), context)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def local_evaluation(config: FedsiteConfig, arrays: dict, context: Context) -> dict[str, float | int]:
    """Metrics of `arrays` on this client's test split (shared with `client/secure.py`)."""
    started = time.perf_counter()
    model, tokenizer = lora_model(config.model, config.lora_settings(), config.seed, config.quantize, client_device(config, context.node_config), config.dtype)
    set_global_arrays(model, arrays)
    _, test_examples = client_splits(config, context.node_config)
    test_examples = test_examples[: config.client_eval_examples]
    metrics: dict[str, float | int] = {"num-examples": len(test_examples)}
    if test_examples:
        result = evaluate(model, tokenizer, test_examples, config.max_seq_len, config.max_new_tokens)
        metrics.update({"eval-loss": result.loss, "eval-accuracy": result.accuracy})
    metrics["eval-seconds"] = time.perf_counter() - started
    return metrics


def query_handler(msg: Message, context: Context) -> Message:
    """Who this client is: its partition id (simulation) and profile name (node config `profile`).

    The coordinator asks once per node and plans each round's package from the answer.
    """
    node = context.node_config
    info = {"partition-id": client_id(context), "profile": str(node.get("profile", ""))}
    if "holds-backbone" in node:  # a deployed client (`fedsite client`) describes its device
        info.update({"holds-backbone": bool(node["holds-backbone"]), "memory-gb": float(node.get("memory-gb", 0.0)), "quantized": bool(node.get("quantized", False))})
        info.update(accelerator_report(str(node.get(DEVICE_KEY) or "auto")))
    info = ConfigRecord(info)
    return Message(content=RecordDict({"client": info}), reply_to=msg)


def accelerator_report(device: str) -> dict[str, str | float]:
    """The accelerator this client trains on, for its query answer: kind (none, cuda, mps) and
    memory in GB. A device this machine lacks reports none (training would decline anyway)."""
    try:
        kind, memory = accelerator_of(resolve_device(device))
    except DeviceError:
        kind, memory = "none", 0.0
    return {"accelerator": kind, "accelerator-memory-gb": float(memory)}


HANDLERS: dict[str, Callable[[Message, Context], Message]] = {"train": train_handler, "evaluate": evaluate_handler, "query": query_handler}
