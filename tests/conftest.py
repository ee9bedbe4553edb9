"""Shared fixtures: the tiny Llama and its tokenizer, built in-process in well under a second."""

from __future__ import annotations

import pytest
import torch

from finetune.backbone import load_backbone


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core box they cost ~10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def serverapp_identity():
    """Messages take their sender from the process's task identity, which Flower's runtime sets:
    here the SuperLink's, as for the messages a ServerApp creates. Modules that build messages
    use it with `pytestmark = pytest.mark.usefixtures("serverapp_identity")`."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


@pytest.fixture()
def tiny():
    """(model, tokenizer) of a fresh tiny random Llama; same weights every time."""
    return load_backbone("tiny")


# End-to-end tests that start real processes for minutes each: the network of real coordinator and
# client processes, `flwr run .` through a managed SuperLink, a two-node Ray cluster, and one
# Flower simulation per aggregation rule (tests/simulations/test_rules_e2e.py; each rule's
# arithmetic is unit-tested in tests/aggregation/, FedAvg's simulation in test_simulate_e2e). Each runs
# when its name is in `-k` (CI runs them in a step of their own), not in the default suite, which
# stays under 15 minutes on 2 cores.
SLOW_TESTS = ("e2e_network", "flwr_run_e2e", "ray_cluster", "rules_e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keyword = config.getoption("keyword") or ""
    for item in items:
        for name in SLOW_TESTS:
            if name in item.nodeid and name not in keyword:
                item.add_marker(pytest.mark.skip(reason=f"starts real processes for minutes: run it with `pytest tests -k {name}`"))
