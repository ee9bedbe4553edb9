import numpy as np
import pytest

from aggregation.hetero_rank import flora_stack, hetlora, pad_to_rank, ranks, truncate_to_rank
from aggregation.lora import product

from tests.aggregation.helpers import HEAD, Q, V, a_key, b_key, lora_update

A, B = a_key(Q), b_key(Q)


def tiny(a, b):
    return {A: np.array(a, dtype=np.float64), B: np.array(b, dtype=np.float64), "bias": np.array([float(len(a))])}


# client 1: rank 1; client 2: rank 2 (in = 2, out = 2)
C1 = tiny([[4.0, 8.0]], [[1.0], [2.0]])
C2 = tiny([[0.0, 4.0], [8.0, 12.0]], [[5.0, 1.0], [6.0, 2.0]])


def test_ranks_are_read_from_shapes():
    assert ranks(C1) == {Q: 1} and ranks(C2) == {Q: 2}
    assert ranks(lora_update(np.random.default_rng(0), rank=5)) == {Q: 5, V: 5}


def test_pad_keeps_the_product_and_truncate_inverts_it():
    u = lora_update(np.random.default_rng(0), rank=3)
    padded = pad_to_rank(u, 8)
    assert padded[a_key(V)].shape == (8, 6) and padded[b_key(V)].shape == (4, 8)
    assert not padded[a_key(V)][3:].any() and not padded[b_key(V)][:, 3:].any()
    for p in (Q, V):
        np.testing.assert_array_equal(product(padded)[p], product(u)[p])
    back = truncate_to_rank(padded, 3)
    for k in u:
        np.testing.assert_array_equal(back[k], u[k])
        assert back[k].dtype == u[k].dtype


def test_pad_and_truncate_reject_the_wrong_direction():
    with pytest.raises(ValueError, match=rf"{A} has rank 2, above the target rank 1"):
        pad_to_rank(C2, 1)
    with pytest.raises(ValueError, match=rf"{A} has rank 1, below the target rank 2"):
        truncate_to_rank(C1, 2)


def test_hetlora_mixed_ranks_then_truncate_gives_hand_computed_matrices():
    glob = hetlora([C1, C2], [1, 3], max_rank=2)
    # weights 1/4, 3/4; C1 padded with a zero row in A and a zero column in B
    np.testing.assert_allclose(glob[A], [[0.25 * 4 + 0.75 * 0, 0.25 * 8 + 0.75 * 4], [0.75 * 8, 0.75 * 12]])
    np.testing.assert_allclose(glob[A], [[1.0, 5.0], [6.0, 9.0]])
    np.testing.assert_allclose(glob[B], [[0.25 * 1 + 0.75 * 5, 0.75 * 1], [0.25 * 2 + 0.75 * 6, 0.75 * 2]])
    np.testing.assert_allclose(glob["bias"], [0.25 * 1 + 0.75 * 2])
    to_c1 = truncate_to_rank(glob, 1)
    np.testing.assert_allclose(to_c1[A], [[1.0, 5.0]])
    np.testing.assert_allclose(to_c1[B], [[4.0], [5.0]])
    to_c2 = truncate_to_rank(glob, 2)
    np.testing.assert_array_equal(to_c2[A], glob[A])


def test_hetlora_default_max_rank_and_padding_beyond():
    rng = np.random.default_rng(1)
    ups = [lora_update(rng, rank=r) for r in (2, 4, 8)]
    assert ranks(hetlora(ups, [1, 1, 1])) == {Q: 8, V: 8}
    assert ranks(hetlora(ups, [1, 1, 1], max_rank=16)) == {Q: 16, V: 16}


def test_flora_stack_hand_computed_and_exact():
    out = flora_stack([C1, C2], [1, 3])
    np.testing.assert_array_equal(out[A], [[4.0, 8.0], [0.0, 4.0], [8.0, 12.0]])  # rows: A1 then A2
    np.testing.assert_allclose(out[B], [[0.25, 0.75 * 5, 0.75], [0.5, 0.75 * 6, 1.5]])
    want = 0.25 * C1[B] @ C1[A] + 0.75 * C2[B] @ C2[A]
    np.testing.assert_allclose(out[B] @ out[A], want, atol=1e-12)
    np.testing.assert_allclose(out["bias"], [1.75])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flora_stack_is_exact_for_mixed_ranks(dtype):
    rng = np.random.default_rng(2)
    rks, weights = (2, 4, 8), [5, 1, 2]
    ups = [lora_update(rng, rank=r, dtype=dtype) for r in rks]
    out = flora_stack(ups, weights)
    assert ranks(out) == {Q: sum(rks), V: sum(rks)}
    assert out[a_key(Q)].dtype == dtype and out[HEAD].shape == (3, 4)
    w = np.asarray(weights, float) / sum(weights)
    for p in (Q, V):
        want = sum(wi * ups[i][b_key(p)].astype(float) @ ups[i][a_key(p)].astype(float) for i, wi in enumerate(w))
        np.testing.assert_allclose(product(out)[p], want, atol=1e-6, rtol=0)


def test_flora_stack_folds_per_client_scalings():
    rng = np.random.default_rng(3)
    ups = [lora_update(rng, rank=r, dtype=np.float64) for r in (2, 4)]
    alpha = 16.0
    out = flora_stack(ups, [1, 1], scalings=[alpha / 2, alpha / 4], out_scaling=alpha / 6)
    want = 0.5 * (alpha / 2) * product(ups[0])[Q] + 0.5 * (alpha / 4) * product(ups[1])[Q]
    np.testing.assert_allclose(product(out, scaling=alpha / 6)[Q], want, atol=1e-10)


def test_flora_stack_rejects_mismatched_modules():
    rng = np.random.default_rng(4)
    u1, u2 = lora_update(rng), lora_update(rng, din=7)
    with pytest.raises(ValueError, match="client 1"):
        flora_stack([u1, u2], [1, 1])
