import json

import pytest

from finetune.config import FedsiteConfig
from finetune.sources import central_eval_set, client_splits, run_splits


def test_clients_get_disjoint_partitions_of_the_builtin_suite():
    config = FedsiteConfig(train_per_task=10, test_per_task=4, partitioning="dirichlet", dirichlet_alpha=0.3)
    parts = [client_splits(config, {"partition-id": i, "num-partitions": 5}) for i in range(5)]
    train_sets = [set(train) for train, _ in parts]
    assert all(train_sets)
    assert sum(len(s) for s in train_sets) == len(set().union(*train_sets)) == len(run_splits(config)[0])
    test_sets = [set(test) for _, test in parts]
    assert set().union(*test_sets) == set(run_splits(config)[1])
    assert not set().union(*train_sets) & set().union(*test_sets)


def test_central_eval_set_is_balanced_over_tasks():
    examples = central_eval_set(FedsiteConfig(eval_examples=12))
    assert len(examples) == 12 and len({ex.task for ex in examples}) == 6


def test_deployed_client_reads_its_own_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": "Say", "input": str(i), "output": str(i)}) for i in range(20)))
    train, test = client_splits(FedsiteConfig(test_fraction=0.25), {"data-path": str(path)})
    assert len(train) == 15 and len(test) == 5 and {ex.task for ex in train} == {"mine"}


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        client_splits(FedsiteConfig(), {"data-path": str(tmp_path / "nope.jsonl")})


def test_user_jsonl_as_run_data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": "Echo", "input": f"w{i}", "output": f"w{i}"}) for i in range(40)))
    config = FedsiteConfig(data=str(path), test_fraction=0.1)
    train, test = run_splits(config)
    assert len(train) == 36 and len(test) == 4
    parts = [client_splits(config, {"partition-id": i, "num-partitions": 4})[0] for i in range(4)]
    assert sum(len(p) for p in parts) == 36
