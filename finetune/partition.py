"""Split examples over clients: IID, Dirichlet over tasks (non-IID) or label-sorted shards.

The heavy lifting is done by flwr-datasets partitioners on a two-column `datasets.Dataset`
(`idx`, `task`); this module adds what they leave to the caller:

- `IidPartitioner` has no shuffle and no seed: it is `Dataset.shard(contiguous=True)`, i.e.
  `numpy.array_split` of the given order, at ~1 ms of Dataset construction per partition.
  IID is therefore `array_split` of a seeded permutation (a test checks it matches
  `IidPartitioner` on the permuted data).
- `DirichletPartitioner` resamples up to 10 times (warning each time) and then raises when a
  partition is smaller than `min_partition_size` (default 10), which is hopeless for hundreds
  of clients; it is run with `min_partition_size=0` and empty partitions are then given one
  example each from the largest ones.
- `ShardPartitioner` sorts the dataset first, so its row positions are not the caller's
  indices (the `idx` column maps them back); it drops the remainder that does not fill a
  shard, and divides by zero when there are fewer examples than shards.

Index lists are cached per argument tuple: every simulated client calls `partition` once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, Partitioner, ShardPartitioner

from finetune.examples import Example

METHODS = ("iid", "dirichlet", "shards")


def _check(num_examples: int, num_partitions: int, method: str, alpha: float, shards_per_partition: int, size_sigma: float = 0.0) -> None:
    if size_sigma < 0 or (size_sigma > 0 and method != "iid"):
        raise ValueError(f"partition-size-sigma: {size_sigma} needs to be 0, or positive with partitioning 'iid' (got '{method}')")
    if method not in METHODS:
        raise ValueError(f"partitioning: unknown method '{method}'; expected one of {', '.join(METHODS)}")
    if num_partitions < 1:
        raise ValueError(f"num-partitions: expected at least 1, got {num_partitions}")
    if num_partitions > num_examples:
        raise ValueError(
            f"num-partitions: cannot give each of {num_partitions} partitions an example out of {num_examples}; "
            "use fewer partitions or more data"
        )
    if method == "dirichlet" and not alpha > 0:
        raise ValueError(f"dirichlet-alpha: expected a positive number, got {alpha}")
    if method == "shards":
        if shards_per_partition < 1:
            raise ValueError(f"shards-per-client: expected at least 1, got {shards_per_partition}")
        if num_partitions * shards_per_partition > num_examples:
            raise ValueError(
                f"shards-per-client: {num_partitions} partitions x {shards_per_partition} shards need at least "
                f"{num_partitions * shards_per_partition} examples, got {num_examples}"
            )


def _fill_empty(parts: list[list[int]]) -> list[list[int]]:
    """Give every empty partition one example taken from the currently largest partition."""
    for part in parts:
        if not part:
            donor = max(parts, key=len)  # first of the largest: deterministic
            part.append(donor.pop())
    return parts


def skewed_sizes(total: int, num_partitions: int, sigma: float, seed: int) -> np.ndarray:
    """Quantity skew: sizes proportional to lognormal(0, sigma) draws, each >= 1, summing to `total`."""
    weights = np.random.default_rng([seed, 1]).lognormal(0.0, sigma, num_partitions)
    sizes = 1 + np.floor(weights / weights.sum() * (total - num_partitions)).astype(int)
    sizes[np.argsort(-weights)[: total - int(sizes.sum())]] += 1  # the remainder to the largest draws
    return sizes


@lru_cache(maxsize=16)
def _cached(tasks: tuple[str, ...], num_partitions: int, method: str, alpha: float, shards: int, seed: int, size_sigma: float = 0.0) -> tuple[tuple[int, ...], ...]:
    if method == "iid":
        order = np.random.default_rng(seed).permutation(len(tasks))
        if size_sigma > 0:
            cuts = np.cumsum(skewed_sizes(len(tasks), num_partitions, size_sigma, seed))[:-1]
            return tuple(tuple(int(i) for i in part) for part in np.split(order, cuts))
        return tuple(tuple(int(i) for i in part) for part in np.array_split(order, num_partitions))
    dataset = Dataset.from_dict({"idx": list(range(len(tasks))), "task": list(tasks)})
    partitioner: Partitioner
    if method == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions, "task", float(alpha), min_partition_size=0, seed=seed)
    else:
        partitioner = ShardPartitioner(num_partitions, "task", num_shards_per_partition=shards, seed=seed)
    partitioner.dataset = dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyarrow's deprecation noise from the shard sort
        parts = _read_partitions(partitioner, num_partitions)
    return tuple(tuple(part) for part in _fill_empty(parts))


def _read_partitions(partitioner: Partitioner, num_partitions: int) -> list[list[int]]:
    """Each partition's `idx` values.

    `load_partition` builds a new Dataset per call (~1 ms: 0.5 s for 500 clients), so for the
    partitioners that keep their assignment in `_partition_id_to_indices` (positions in their
    possibly re-sorted `dataset`) it is read directly; anything else goes the public way.
    """
    _ = partitioner.num_partitions  # public trigger: validates and computes the assignment
    assignment = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(assignment, dict) and sorted(assignment) == list(range(num_partitions)):
        idx = list(partitioner.dataset["idx"])
        return [[int(idx[pos]) for pos in assignment[pid]] for pid in range(num_partitions)]
    return [list(partitioner.load_partition(pid)["idx"]) for pid in range(num_partitions)]


def partition_indices(
    examples: Sequence[Example],
    num_partitions: int,
    method: str = "iid",
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    seed: int = 0,
    size_sigma: float = 0.0,
) -> list[list[int]]:
    """Indices into `examples` for each of `num_partitions` clients.

    Every partition is non-empty and no index is used twice. "iid" and "dirichlet" use every
    example; "shards" leaves out the remainder that does not fill a whole shard. Only the
    `task` labels matter, so the result is deterministic given the labels and arguments.
    "iid" with `size_sigma` > 0 gives partitions of lognormally skewed sizes (quantity skew).
    """
    _check(len(examples), num_partitions, method, alpha, shards_per_partition, size_sigma)
    tasks = tuple(ex.task for ex in examples)
    return [list(part) for part in _cached(tasks, num_partitions, method, float(alpha), shards_per_partition, seed, float(size_sigma))]


def partition(
    examples: Sequence[Example],
    num_partitions: int,
    partition_id: int,
    method: str = "iid",
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    seed: int = 0,
    size_sigma: float = 0.0,
) -> list[Example]:
    """The examples of client `partition_id` (see `partition_indices`)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id: expected 0..{num_partitions - 1}, got {partition_id}")
    indices = partition_indices(examples, num_partitions, method, alpha, shards_per_partition, seed, size_sigma)
    return [examples[i] for i in indices[partition_id]]
