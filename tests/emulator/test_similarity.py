"""Kept blocks by representation similarity (CRaSh): linear CKA, the exact split into runs, the layer map, the build."""

import numpy as np
import pytest
import torch

from emulator.cli import build_command, distillation_batches, verify_command
from emulator.layers import make_layer_map
from emulator.similarity import block_updates, cka_matrix, linear_cka, segment, select_by_similarity, similarity_layer_map
from finetune.backbone import build_char_tokenizer, build_tiny_llama


def test_linear_cka_is_one_for_rotations_and_scalings_and_low_for_unrelated():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0)  # rotation, scale and shift
    assert linear_cka(x, torch.randn(200, 16, generator=g, dtype=torch.float64)) < 0.2


def test_segment_finds_the_runs_of_a_block_structure_and_their_medoids():
    sim = np.full((7, 7), 0.1)
    for a, b in ((0, 2), (2, 5), (5, 7)):
        sim[a:b, a:b] = 0.9
    sim[3, 2] = sim[2, 3] = 0.8  # block 3 is the most central of run 2..4
    sim[3, 4] = sim[4, 3] = 0.95
    sim[2, 4] = sim[4, 2] = 0.5
    np.fill_diagonal(sim, 1.0)
    assert segment(sim, 3) == [(0, 2, 0), (2, 5, 3), (5, 7, 5)]
    assert segment(sim, 1) == [(0, 7, 3)]
    assert segment(sim, 7) == [(i, i + 1, i) for i in range(7)]
    with pytest.raises(ValueError, match="cannot split 7 middle blocks into 8 runs"):
        segment(sim, 8)


def test_layer_map_keeps_each_runs_medoid_and_shares_it_within_the_run():
    sim = np.eye(6)
    sim[0:4, 0:4] = np.maximum(sim[0:4, 0:4], 0.9)
    sim[4:6, 4:6] = np.maximum(sim[4:6, 4:6], 0.9)
    sim[1, 2] = sim[2, 1] = 0.99
    sim[0, 1] = sim[1, 0] = 0.95  # run 0..3 centres on block 1 of the middle (original 2)
    drop = similarity_layer_map(8, 1, 2, sim)
    assert drop.middle_kept == (2, 5) and drop.fill == "drop" and drop.emulator_layers() == (0, 2, 5, 7)
    share = similarity_layer_map(8, 1, 2, sim, "share")
    # original blocks 1..4 run block 2, 5..6 run block 5; adapters run themselves
    assert share.slots == (0, 2, 2, 2, 2, 5, 5, 7) and share.emulator_layers() == drop.emulator_layers()


def identity_blocks(model, blocks):
    """Zero the residual branches' output projections: these blocks pass their input through unchanged."""
    for i in blocks:
        layer = model.model.layers[i]
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    return model


def test_block_updates_are_what_each_block_adds_and_blocks_adding_nothing_are_alike():
    model = identity_blocks(build_tiny_llama(layers=8), (3, 5, 6))
    batches = distillation_batches(build_char_tokenizer())[:2]
    updates = block_updates(model, batches, range(1, 7))
    tokens = int(sum(b["attention_mask"].sum() for b in batches))
    assert updates[1].shape == (tokens, 64)  # real tokens only, padding left out
    assert all(float(updates[i].abs().max()) == 0.0 for i in (3, 5, 6)) and float(updates[2].abs().max()) > 0
    sim = cka_matrix(updates)  # positions 0..5 are blocks 1..6
    assert sim[4, 5] == 1.0 and sim[2, 4] == 1.0 and sim[1, 2] == 0.0 and 0.0 < sim[0, 1] < 1.0


def test_selection_on_a_backbone_keeps_as_many_blocks_as_the_stride_one_per_run():
    model = identity_blocks(build_tiny_llama(layers=8), (5, 6))
    batches = distillation_batches(build_char_tokenizer())[:2]
    shared, sim = select_by_similarity(model, batches, make_layer_map(8, 1, 2, "share"))  # stride 2 keeps 3 of blocks 1..6
    runs = segment(sim, 3)
    assert len(shared.middle_kept) == 3 and shared.middle_kept == tuple(1 + m for _, _, m in runs)
    assert (4, 6, 4) in runs  # blocks 5 and 6 add nothing alike: one run, one of them kept
    for a, b, m in runs:  # every slot of a run runs the run's kept block; adapters run themselves
        assert all(shared.slots[1 + i] == 1 + m for i in range(a, b))
    assert shared.slots[0] == 0 and shared.slots[7] == 7
    dropped, _ = select_by_similarity(model, batches, make_layer_map(8, 1, 2))
    assert dropped.middle_kept == shared.middle_kept and dropped.fill == "drop"


def test_build_and_verify_with_similarity_selection(tmp_path, capsys):
    summary = build_command("tiny", str(tmp_path / "pkg"), 1, 2, None, None, fill="share", select="similarity")
    out = capsys.readouterr().out
    assert "(by similarity)" in out and summary["select"] == "similarity"
    stride = build_command("tiny", str(tmp_path / "stride"), 1, 2, None, None, fill="share")
    assert summary["emulator_bytes"] == stride["emulator_bytes"]  # as many kept blocks: the same bytes
    capsys.readouterr()
    assert verify_command(str(tmp_path / "pkg")) == 0
    with pytest.raises(ValueError, match="select must be"):
        build_command("tiny", str(tmp_path / "bad"), 1, 2, None, None, select="random")
