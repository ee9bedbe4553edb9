"""Shared fixtures: the tiny Llama and its tokenizer, built in-process in well under a second."""

from __future__ import annotations

import pytest

from finetune.backbone import load_backbone


@pytest.fixture()
def tiny():
    """(model, tokenizer) of a fresh tiny random Llama; same weights every time."""
    return load_backbone("tiny")
