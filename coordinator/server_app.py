"""The Fedsite ServerApp: holds the backbone, runs the rounds, evaluates, writes results.

`fedsite simulate` builds the app around an explicit config with `make_server_app`; `flwr run .`
and `fedsite coordinator` reach simulations/server_app.py's `app` with the run config from
pyproject.toml. All of them go through `run_federation`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from coordinator.aggregate import Aggregator
from coordinator.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, remove_checkpoint, restore, save_checkpoint
from coordinator.client_dp import ClientLevelDP
from coordinator.directory import assigned_train_examples
from coordinator.grid import quick
from coordinator.module_selection import selection_for
from coordinator.offsite import OffsiteTrack, join_tracks, offsite_evaluation, offsite_wanted, prepare_offsite, split_tracks
from coordinator.planner import PopulationModel, planner_for
from coordinator.model_card import write_model_card
from coordinator.results import RunRecorder
from coordinator.strategy import FedsiteStrategy
from finetune.backbone import BACKBONE_NOTE
from finetune.base_delta import export_merged_adapter, set_global_arrays, split_base
from finetune.cache import initial_lora_arrays, lora_model
from finetune.config import ConfigError, FedsiteConfig
from finetune.evaluate import EvalResult, evaluate
from finetune.lora import export_adapter
from finetune.sources import central_eval_set
from protos.tensors import from_array_record, to_array_record

log = logging.getLogger("fedsite.coordinator")


def run_federation(grid: Grid, config: FedsiteConfig, population: PopulationModel | None = None) -> RunRecorder:
    """Initialise LoRA on the backbone, federate for the configured rounds, export the adapter.

    `population` (a simulated one, from simulations/) gives the planner device profiles,
    availability and deadlines; without it, clients get the run's package as they are.
    """
    config.validate()
    grid = quick(grid)  # replies every 0.1 s, not every 3 s, on a deployed SuperLink
    checkpoint = None if config.secure else load_checkpoint(config)  # resume after the last completed round
    recorder = RunRecorder(config.out, config, fresh=checkpoint is None)
    # central evaluation on the run's device (`fedsite coordinator --device`); the initial arrays are the same on every device
    model, tokenizer = lora_model(config.model, config.lora_settings(), config.seed, device=config.device, dtype=config.dtype)
    initial = initial_lora_arrays(config.model, config.lora_settings(), config.seed, device=config.device, dtype=config.dtype)
    if config.secure:  # SecAgg+ runs on Flower's legacy workflow; recording and export are shared
        from coordinator.secure import run_secure

        evaluate_round = central_evaluator(config, recorder, model, tokenizer)
        finish_run(model, run_secure(grid, config, recorder, initial, evaluate_round), config, recorder)
        return recorder
    aggregator = Aggregator(config.aggregation, config.server_lr, config.server_momentum, config.trim_fraction, config.lora_alpha / config.lora_rank)
    strategy = FedsiteStrategy(
        recorder,
        aggregator,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_clients=min(config.min_train_clients, config.clients),
        max_update_norm=config.max_update_norm,
        max_update_norm_multiple=config.max_update_norm_multiple,
        max_update_bytes=int(config.max_update_mb * 1e6),
        max_client_examples=config.max_client_examples,
        max_weight_share=config.max_weight_share,
        assigned_examples=assigned_train_examples(config),
        client_dp=client_level_dp(config),
        planner=planner_for(config, population),
    )
    strategy.module_selection = selection_for(config, initial)  # Kill-and-Revive (None: every module trains)
    if offsite_wanted(config, strategy.planner):  # some clients get an emulator instead of the backbone
        strategy.offsite = prepare_offsite(config, resumed=checkpoint is not None)
        strategy.offsite_aggregator = Aggregator(config.aggregation, config.server_lr, config.server_momentum, config.trim_fraction)
        initial = join_tracks(initial, strategy.offsite.initial)
        if strategy.module_selection is not None:  # population profiles without the backbone: offsite clients train their own adapter
            raise ConfigError("config field 'module-selection' = 'kill-revive' must be 'all' with emulator clients (the population has profiles that hold no backbone)")
    evaluate_round = central_evaluator(config, recorder, model, tokenizer, strategy.offsite)

    start = initial
    if checkpoint is not None:
        try:  # the strategy first: nothing in the results folder changes unless all of it is restored
            strategy.load_state_dict(checkpoint.meta.get("strategy") or {}, checkpoint.state_arrays)  # privacy ledger, selections, offsite refresh
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise CheckpointError(f"checkpoint '{checkpoint_path(config.out)}': corrupted strategy state ({err}); move it away or use another --out to start afresh") from None
        restore(checkpoint, recorder, aggregator, strategy.client_dp)
        strategy.round_offset, start = checkpoint.round, checkpoint.arrays

    def central_evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if flower_round == 0 and strategy.round_offset:
            return None  # resumed: the baseline and the rounds so far come from the checkpoint
        server_round = flower_round + strategy.round_offset
        seconds = strategy.round_seconds() if server_round else None
        current = from_array_record(arrays)
        metrics = evaluate_round(server_round, current, seconds)
        if server_round:
            save_checkpoint(recorder, server_round, current, aggregator, strategy.client_dp, strategy.state_dict(), strategy.state_arrays())
        return MetricRecord(metrics)

    result = strategy.start(
        grid=grid,
        initial_arrays=to_array_record(start),
        num_rounds=config.num_server_rounds - strategy.round_offset,
        timeout=config.round_timeout,
        train_config=ConfigRecord(config.to_flat()),
        evaluate_config=ConfigRecord(config.to_flat()),
        evaluate_fn=central_evaluate,
    )
    finish_run(model, from_array_record(result.arrays) if len(result.arrays) else start, config, recorder, strategy.offsite)
    remove_checkpoint(config.out)
    return recorder


def finish_run(model: PeftModel, final: dict[str, np.ndarray], config: FedsiteConfig, recorder: RunRecorder, offsite: OffsiteTrack | None = None) -> None:
    """Export the final adapter(s) in PEFT format and write the summary (every path ends here)."""
    final, final_offsite = split_tracks(final)
    set_global_arrays(model, final)
    lora, base = split_base(final)
    if base:  # fedex-lora / flora: the base-weight update goes into an exact higher-rank adapter
        export_merged_adapter(model, lora, base, Path(config.out) / "adapter", config.model)
    else:
        export_adapter(model, Path(config.out) / "adapter", config.model)
    extra = {}
    if offsite is not None:  # the plug-in: the full backbone with the offsite clients' adapter
        offsite.export(final_offsite, Path(config.out) / "offsite_adapter", config.model)
        extra["offsite"] = offsite.summary
    recorder.write_summary(**extra)
    write_model_card(Path(config.out) / "adapter", config, recorder.initial, recorder.rounds)
    if (Path(config.out) / "offsite_adapter" / BACKBONE_NOTE).is_file():  # LoRA mode: a PEFT adapter for the full backbone
        write_model_card(Path(config.out) / "offsite_adapter", config, recorder.initial, recorder.rounds, offsite=True)
    log.info("[fedsite] results written to %s", config.out)


def central_evaluator(
    config: FedsiteConfig, recorder: RunRecorder, model: PeftModel, tokenizer: PreTrainedTokenizerBase, offsite: OffsiteTrack | None = None
) -> Callable[[int, dict, float | None], dict]:
    """The coordinator's held-out evaluation of round k's arrays, closing the round in the recorder.

    Round 0 is the baseline; `round_seconds` is the round's wall time from its start. With an
    offsite track the plug-in is scored too (`offsite_eval_*`), and the emulator itself at the
    baseline and the last round (`emulator_eval_*`); in a run of offsite clients only, the
    headline `eval_*` is the plug-in's.
    """
    eval_set = central_eval_set(config)

    def central_evaluate(server_round: int, arrays: dict, round_seconds: float | None = None) -> dict:
        started = time.perf_counter()
        arrays, offsite_arrays = split_tracks(arrays)
        fields: dict = {}
        if offsite is not None:
            fields = offsite_evaluation(offsite, offsite_arrays, eval_set, config, server_round in (0, config.num_server_rounds))
        if offsite is not None and config.emulator_share >= 1.0 and not config.experiment:
            result = EvalResult(fields["offsite_eval_loss"], fields["offsite_eval_accuracy"], len(eval_set), fields["offsite_eval_per_task"])
        else:
            set_global_arrays(model, arrays)
            result = evaluate(model, tokenizer, eval_set, config.max_seq_len, config.max_new_tokens)
        row = recorder.finish_round(
            server_round,
            {
                "eval_loss": result.loss,
                "eval_accuracy": result.accuracy,
                "eval_per_task": result.per_task,
                **fields,
                "eval_seconds": time.perf_counter() - started,
                **({"round_seconds": round_seconds} if round_seconds is not None else {}),
            },
        )
        log.info(
            "[fedsite] round %d/%d | eval accuracy %.3f | eval loss %.3f%s",
            server_round,
            config.num_server_rounds,
            result.accuracy,
            result.loss,
            f" | train loss {row['train_loss']:.3f} | clients {len(row.get('contributors', []))}" if "train_loss" in row else "",
        )
        return {"eval-accuracy": result.accuracy, "eval-loss": result.loss}

    return central_evaluate


def client_level_dp(config: FedsiteConfig) -> ClientLevelDP | None:
    if config.dp != "client":
        return None
    return ClientLevelDP(config.noise_multiplier, config.dp_clip_norm, config.delta, adaptive=config.dp_adaptive_clip)


def make_server_app(config: FedsiteConfig, population: PopulationModel | None = None) -> ServerApp:
    """A ServerApp bound to `config` (run config from Flower is ignored), for in-process runs.

    The Flower app's own ServerApp (`flwr run .`, and what `fedsite coordinator` submits) is in
    simulations/server_app.py: it builds the run's population model, which only simulations have.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, population)

    return server_app
