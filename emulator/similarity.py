"""Kept middle blocks chosen by representation similarity (CRaSh, Zhang et al. 2023), not a fixed stride.

CRaSh observes that the blocks of a decoder cluster: runs of adjacent blocks behave alike, so
one block of a run can stand in for the others. Here:

1. run the backbone on public examples (the distillation set: built-in families under their
   own seed, or `--emulator-distill-data`) and take what every middle block adds to the
   residual stream (its output minus its input hidden state) at the real (unpadded) tokens;
2. score each pair of middle blocks by linear CKA (Kornblith et al. 2019) of those updates.
   Not of the hidden states themselves: on SmolLM2 a few massive residual dimensions make the
   hidden states of every block from the 11th on look alike (linear CKA 1.00 between all of
   them, even per-dimension standardised), which would keep one block for 17; the updates
   separate them (adjacent CKA 0.04-0.92) and show runs such as blocks 3-7 and 16-22;
3. split the middle into as many contiguous runs as the stride would keep blocks (so the
   package's bytes match `emulator-select = "stride"`), maximising the summed CKA of every
   block with its run's representative: the run's medoid, the block most similar to the rest
   (dynamic programming over the split points, exact);
4. keep the representatives; with fill "share" every dropped slot runs its own run's
   representative (rather than the nearest kept block), with "drop" the runs collapse.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from emulator.layers import LayerMap


@torch.no_grad()
def block_updates(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """What each of `blocks` adds to the residual stream (output minus input hidden state) at every
    real token of `batches`: {block: [tokens, d]} (float64)."""
    was_training = model.training
    model.eval()
    parts: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
    try:
        for batch in batches:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
            mask = batch["attention_mask"].bool()
            states = out.hidden_states  # [0] is the embedding, [b + 1] block b's output
            for b in blocks:
                parts[b].append((states[b + 1][mask].double() - states[b][mask].double()).cpu())
    finally:
        model.train(was_training)
    return {b: torch.cat(p) for b, p in parts.items()}


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two [n, d] representations of the same n inputs: 1 for equal up to rotation and
    scale; two constant ones (a block that adds nothing) count as alike, one constant one as unlike."""
    x, y = x - x.mean(0), y - y.mean(0)
    nx, ny = float(torch.linalg.matrix_norm(x.T @ x)), float(torch.linalg.matrix_norm(y.T @ y))
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2) / (nx * ny)


def cka_matrix(representations: dict[int, torch.Tensor]) -> np.ndarray:
    """Pairwise linear CKA of the blocks' representations, in the order of `representations`."""
    reps = list(representations.values())
    n = len(reps)
    sim = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = linear_cka(reps[i], reps[j])
    return sim


def segment(similarity: np.ndarray, count: int) -> list[tuple[int, int, int]]:
    """Split positions 0..n-1 into `count` contiguous runs maximising the summed similarity of each
    position to its run's medoid; returns (start, end exclusive, medoid) per run, in order."""
    n = len(similarity)
    if not 1 <= count <= n:
        raise ValueError(f"similarity selection: cannot split {n} middle blocks into {count} runs")

    def best(a: int, b: int) -> tuple[float, int]:  # run [a, b): (score, medoid), ties to the earlier block
        scores = similarity[a:b, a:b].sum(axis=0)
        m = int(np.argmax(scores))
        return float(scores[m]), a + m

    runs = {(a, b): best(a, b) for a in range(n) for b in range(a + 1, n + 1)}
    value = np.full((count + 1, n + 1), -np.inf)
    cut = np.zeros((count + 1, n + 1), dtype=int)
    value[0, 0] = 0.0
    for c in range(1, count + 1):
        for b in range(c, n + 1):
            for a in range(c - 1, b):
                v = value[c - 1, a] + runs[(a, b)][0]
                if v > value[c, b]:
                    value[c, b], cut[c, b] = v, a
    bounds, b = [], n
    for c in range(count, 0, -1):
        a = int(cut[c, b])
        bounds.append((a, b, runs[(a, b)][1]))
        b = a
    return bounds[::-1]


def similarity_layer_map(num_layers: int, adapter_layers: int, count: int, similarity: np.ndarray, fill: str = "drop") -> LayerMap:
    """The layer map keeping each run's medoid of the middle blocks k .. L-k-1 (`similarity` over them)."""
    L, k = int(num_layers), int(adapter_layers)
    middle = list(range(k, L - k))
    if similarity.shape != (len(middle), len(middle)):
        raise ValueError(f"similarity selection: a {similarity.shape} matrix for {len(middle)} middle blocks")
    runs = segment(similarity, count)
    kept = tuple(middle[m] for _, _, m in runs)
    slots: tuple[int, ...] = ()
    if fill == "share":
        own = list(range(L))  # adapters run themselves; every middle slot its run's kept block
        for a, b, m in runs:
            for i in range(a, b):
                own[middle[i]] = middle[m]
        slots = tuple(own)
    return LayerMap(L, tuple(range(k)), kept, tuple(range(L - k, L)), fill, slots)


def select_by_similarity(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], layer_map: LayerMap) -> tuple[LayerMap, np.ndarray]:
    """`layer_map`'s adapters, fill and number of kept middle blocks, the kept ones chosen by
    similarity on `batches`; with the CKA matrix of the middle blocks."""
    k, L = layer_map.k, layer_map.num_layers
    similarity = cka_matrix(block_updates(model, batches, range(k, L - k)))
    return similarity_layer_map(L, k, len(layer_map.middle_kept), similarity, layer_map.fill), similarity
