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
def tiny():
    """(model, tokenizer) of a fresh tiny random Llama; same weights every time."""
    return load_backbone("tiny")
