"""Which examples a run, a client and the coordinator's held-out evaluation use.

The built-in suite and a user's file are split once into train/test; clients get their
partition of the train split (and of the test split for federated evaluation). Results are
cached per process because every simulated client in a worker asks for the same source.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from finetune.config import FedsiteConfig
from finetune.examples import Example
from finetune.partition import partition
from finetune.tasks import builtin_splits
from finetune.userdata import load_examples, split_train_test


@lru_cache(maxsize=4)
def _splits(data: str, train_per_task: int, test_per_task: int, test_fraction: float, seed: int) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    if data == "builtin":
        train, test = builtin_splits(train_per_task, test_per_task, seed)
    else:
        train, test = split_train_test(load_examples(data), test_fraction, seed)
    return tuple(train), tuple(test)


def run_splits(config: FedsiteConfig) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(train, test) of the run's data source."""
    return _splits(config.data, config.train_per_task, config.test_per_task, config.test_fraction, config.seed)


def central_eval_set(config: FedsiteConfig) -> list[Example]:
    """The coordinator's held-out examples (the first `eval-examples` of the test split)."""
    return list(run_splits(config)[1][: config.eval_examples])


def client_splits(config: FedsiteConfig, node_config: Mapping[str, object]) -> tuple[list[Example], list[Example]]:
    """This client's (train, test) examples.

    A deployed client names its own data with `data-path` in its node config; a simulated
    client gets partition `partition-id` of `num-partitions` of the run's data source.
    """
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        if not Path(path).exists():
            raise FileNotFoundError(f"data-path: '{path}' does not exist")
        train, test = split_train_test(load_examples(path), config.test_fraction, config.seed)
        return list(train), list(test)
    partition_id = int(node_config.get("partition-id", 0))
    num_partitions = int(node_config.get("num-partitions", config.clients))
    train, test = run_splits(config)
    kwargs = dict(method=config.partitioning, alpha=config.dirichlet_alpha, shards_per_partition=config.shards_per_client, seed=config.seed, size_sigma=config.partition_size_sigma)
    client_train = partition(train, num_partitions, partition_id, **kwargs)  # only this client's examples are copied
    # Test examples are spread IID: there may be fewer than clients need for a skewed split.
    client_test = [ex for i, ex in enumerate(test) if i % num_partitions == partition_id]
    return client_train, client_test
