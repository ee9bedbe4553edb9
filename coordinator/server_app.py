"""The Fedsite ServerApp: holds the backbone, runs the rounds, evaluates, writes results.

`flwr run .` reaches `app` with the run config from pyproject.toml; `fedsite simulate` builds
the same app around an explicit config with `make_server_app`. Both go through `run_federation`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from coordinator.aggregate import Aggregator
from coordinator.client_dp import ClientLevelDP
from coordinator.results import RunRecorder
from coordinator.strategy import FedsiteStrategy
from finetune.backbone import resolve_model_path
from finetune.cache import initial_lora_arrays, lora_model
from finetune.config import FedsiteConfig, from_mapping
from finetune.evaluate import evaluate
from finetune.logs import setup_logging
from finetune.lora import export_adapter, set_lora_arrays
from finetune.sources import central_eval_set
from protos.tensors import from_array_record, to_array_record

log = logging.getLogger("fedsite.coordinator")


def run_federation(grid: Grid, config: FedsiteConfig) -> RunRecorder:
    """Initialise LoRA on the backbone, federate for the configured rounds, export the adapter."""
    config.validate()
    recorder = RunRecorder(config.out, config)
    model, tokenizer = lora_model(config.model, config.lora_settings(), config.seed)
    initial = initial_lora_arrays(config.model, config.lora_settings(), config.seed)
    eval_set = central_eval_set(config)
    aggregator = Aggregator(config.aggregation, config.server_lr, config.server_momentum, config.trim_fraction)
    strategy = FedsiteStrategy(
        recorder,
        aggregator,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_clients=min(config.min_train_clients, config.clients),
        max_update_norm=config.max_update_norm,
        max_update_bytes=int(config.max_update_mb * 1e6),
        client_dp=client_level_dp(config),
    )

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        started = time.perf_counter()
        set_lora_arrays(model, from_array_record(arrays))
        result = evaluate(model, tokenizer, eval_set, config.max_seq_len, config.max_new_tokens)
        row = recorder.finish_round(
            server_round,
            {
                "eval_loss": result.loss,
                "eval_accuracy": result.accuracy,
                "eval_per_task": result.per_task,
                "eval_seconds": time.perf_counter() - started,
                **({"round_seconds": strategy.round_seconds()} if server_round else {}),
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
        return MetricRecord({"eval-accuracy": result.accuracy, "eval-loss": result.loss})

    result = strategy.start(
        grid=grid,
        initial_arrays=to_array_record(initial),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord(config.to_flat()),
        evaluate_config=ConfigRecord(config.to_flat()),
        evaluate_fn=central_evaluate,
    )
    set_lora_arrays(model, from_array_record(result.arrays) if len(result.arrays) else initial)
    export_adapter(model, Path(config.out) / "adapter", resolve_model_path(config.model))
    recorder.write_summary()
    log.info("[fedsite] results written to %s", config.out)
    return recorder


def client_level_dp(config: FedsiteConfig) -> ClientLevelDP | None:
    if config.dp != "client":
        return None
    return ClientLevelDP(config.noise_multiplier, config.dp_clip_norm, config.delta, adaptive=config.dp_adaptive_clip, seed=None)


def make_server_app(config: FedsiteConfig) -> ServerApp:
    """A ServerApp bound to `config` (run config from Flower is ignored), for in-process runs."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: the run config comes from pyproject.toml (and overrides)."""
    setup_logging()
    run_federation(grid, from_mapping(context.run_config))
