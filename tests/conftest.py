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


NETWORK_TESTS = "e2e_network"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The network end-to-end test starts real coordinator and client processes (minutes): it runs
    when asked for (`pytest tests -k e2e_network`, as CI does in its own step), not in the default
    suite, which stays under 15 minutes on 2 cores."""
    if NETWORK_TESTS in (config.getoption("keyword") or ""):
        return
    skip = pytest.mark.skip(reason="starts real processes for minutes: run it with `pytest tests -k e2e_network`")
    for item in items:
        if NETWORK_TESTS in item.nodeid:
            item.add_marker(skip)
