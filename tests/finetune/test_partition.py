"""Partitioners: disjoint, non-empty, deterministic; IID balanced, Dirichlet skewed, shards."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from datasets import Dataset
import warnings

from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

from finetune.examples import Example
from finetune.partition import _read_partitions, partition, partition_indices
from finetune.tasks import generate_suite


@pytest.fixture(scope="module")
def suite() -> list[Example]:
    return generate_suite(100, seed=0)  # 600 examples, 6 tasks


def _check_disjoint(parts: list[list[int]], n: int, covering: bool) -> None:
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat)) and all(0 <= i < n for i in flat)
    assert all(parts)
    if covering:
        assert sorted(flat) == list(range(n))


def _mean_max_task_share(examples: list[Example], parts: list[list[int]]) -> float:
    shares = [max(Counter(examples[i].task for i in part).values()) / len(part) for part in parts]
    return float(np.mean(shares))


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_disjoint_nonempty_deterministic(suite, method):
    parts = partition_indices(suite, 20, method=method, seed=1)
    _check_disjoint(parts, len(suite), covering=method != "shards")
    assert parts == partition_indices(suite, 20, method=method, seed=1)
    assert parts != partition_indices(suite, 20, method=method, seed=2)


def test_iid_balanced_and_matches_flwr_iid_partitioner(suite):
    parts = partition_indices(suite, 7, seed=3)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # Same result as IidPartitioner applied to the seeded permutation of the data.
    order = [i for part in parts for i in part]
    reference = IidPartitioner(7)
    reference.dataset = Dataset.from_dict({"idx": order})
    assert [list(reference.load_partition(p)["idx"]) for p in range(7)] == parts


def test_dirichlet_more_skewed_than_iid(suite):
    iid = partition_indices(suite, 10, method="iid", seed=0)
    skewed = partition_indices(suite, 10, method="dirichlet", alpha=0.1, seed=0)
    assert _mean_max_task_share(suite, iid) < 0.4  # 6 tasks: ~1/6 each
    assert _mean_max_task_share(suite, skewed) > 0.6


def test_dirichlet_many_clients_all_nonempty():
    examples = generate_suite(200, seed=0)  # 1200 examples over 500 clients, small alpha
    parts = partition_indices(examples, 500, method="dirichlet", alpha=0.1, seed=0)
    _check_disjoint(parts, len(examples), covering=True)


def test_shards_give_few_tasks_per_client(suite):
    # 12 clients x 2 shards: 24 shards of 25, each inside one task (100 per task, sorted).
    parts = partition_indices(suite, 12, method="shards", shards_per_partition=2, seed=0)
    assert all(len(p) == 50 for p in parts)
    assert all(len({suite[i].task for i in p}) <= 2 for p in parts)


def test_partition_returns_examples_of_the_client(suite):
    parts = partition_indices(suite, 5, method="dirichlet", alpha=0.5, seed=4)
    for pid in range(5):
        assert partition(suite, 5, pid, method="dirichlet", alpha=0.5, seed=4) == [suite[i] for i in parts[pid]]


def test_single_task_user_data():
    examples = [Example("q", str(i), "a") for i in range(30)]
    for method in ("iid", "dirichlet", "shards"):
        _check_disjoint(partition_indices(examples, 4, method=method, seed=0), 30, covering=method != "shards")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_partitions=3, method="random"), "random"),
        (dict(num_partitions=0), "num-partitions"),
        (dict(num_partitions=11), "11 partitions"),
        (dict(num_partitions=2, method="dirichlet", alpha=0.0), "dirichlet-alpha"),
        (dict(num_partitions=4, method="shards", shards_per_partition=3), "shards"),
    ],
)
def test_errors_are_one_line(kwargs, match):
    examples = generate_suite(2, seed=0)[:10]
    with pytest.raises(ValueError, match=match) as err:
        partition_indices(examples, **kwargs)
    assert "\n" not in str(err.value)


def test_partition_id_out_of_range(suite):
    with pytest.raises(ValueError, match="partition-id"):
        partition(suite, 4, 4)


@pytest.mark.parametrize("make", [
    lambda: DirichletPartitioner(8, "task", 0.3, min_partition_size=0, seed=5),
    lambda: ShardPartitioner(8, "task", num_shards_per_partition=2, seed=5),
])
def test_fast_read_matches_public_load_partition(suite, make):
    """The shortcut through `_partition_id_to_indices` must agree with `load_partition`."""
    tasks = [ex.task for ex in suite]
    fast, public = make(), make()
    for p in (fast, public):
        p.dataset = Dataset.from_dict({"idx": list(range(len(tasks))), "task": tasks})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [list(public.load_partition(pid)["idx"]) for pid in range(8)]
        assert _read_partitions(fast, 8) == expected
