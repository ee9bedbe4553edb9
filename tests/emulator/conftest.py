"""Fixtures for emulator tests: an 8-block tiny Llama (so layer drop has something to drop)."""

from __future__ import annotations

import pytest
import torch

from emulator.layers import make_layer_map
from emulator.keys import generate_signing_key
from finetune.backbone import build_char_tokenizer, build_tiny_llama



@pytest.fixture()
def tiny8():
    """(model, tokenizer): a tiny random Llama with 8 blocks, same weights every time."""
    model = build_tiny_llama(seed=0, layers=8).eval()
    return model, build_char_tokenizer()


@pytest.fixture()
def map8():
    """k=2 adapters each end, stride 2: keeps (0, 1 | 2, 4 | 6, 7), drops 3 and 5."""
    return make_layer_map(8, 2, 2)


@pytest.fixture()
def batch(tiny8):
    tokenizer = tiny8[1]
    return dict(tokenizer(["the quick brown fox", "jumps over 12 lazy dogs!"], return_tensors="pt", padding=True))


@pytest.fixture()
def signing_key(tmp_path):
    return generate_signing_key(tmp_path / "keys" / "signing_key.pem")


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits
