"""Averaging over partial module sets: exact for what was sent, untouched elsewhere."""

import numpy as np
import pytest

from aggregation.partial import merge, partial_mean, subset
from tests.aggregation.helpers import HEAD, Q, V, a_key, b_key, lora_update


def test_each_key_is_the_weighted_mean_of_the_clients_that_sent_it():
    rng = np.random.default_rng(0)
    current = lora_update(rng)
    full = [lora_update(rng) for _ in range(3)]
    sent = [subset(full[0], [a_key(Q), b_key(Q)]), subset(full[1], [a_key(Q), b_key(Q), a_key(V), b_key(V)]), subset(full[2], [a_key(V), b_key(V)])]
    weights = [1.0, 3.0, 6.0]
    out = partial_mean(current, sent, weights)
    for key in (a_key(Q), b_key(Q)):  # clients 0 and 1
        np.testing.assert_allclose(out[key], (1 * full[0][key].astype(np.float64) + 3 * full[1][key]) / 4, rtol=1e-6)
    for key in (a_key(V), b_key(V)):  # clients 1 and 2
        np.testing.assert_allclose(out[key], (3 * full[1][key].astype(np.float64) + 6 * full[2][key]) / 9, rtol=1e-6)
    assert np.array_equal(out[HEAD], current[HEAD]) and out[HEAD] is not current[HEAD]  # nobody sent it: bit for bit
    assert list(out) == list(current) and all(out[k].dtype == current[k].dtype for k in out)


def test_a_zero_weight_client_does_not_count_for_a_key_only_it_sent():
    rng = np.random.default_rng(1)
    current = lora_update(rng, head=False)
    one, two = lora_update(rng, head=False), lora_update(rng, head=False)
    out = partial_mean(current, [subset(one, [a_key(Q)]), subset(two, [a_key(V)])], [1.0, 0.0])
    assert np.array_equal(out[a_key(Q)], one[a_key(Q)]) and np.array_equal(out[a_key(V)], current[a_key(V)])


def test_keys_outside_the_global_and_bad_weights_are_errors():
    current = lora_update(np.random.default_rng(2), head=False)
    with pytest.raises(ValueError, match="not in the global"):
        partial_mean(current, [{"x": np.zeros(1, np.float32)}], [1.0])
    with pytest.raises(ValueError, match="weights"):
        partial_mean(current, [subset(current, [a_key(Q)])], [0.0])


def test_merge_replaces_only_the_updated_keys():
    rng = np.random.default_rng(3)
    current, new = lora_update(rng), lora_update(rng)
    out = merge(current, subset(new, [b_key(V)]))
    assert np.array_equal(out[b_key(V)], new[b_key(V)])
    assert all(np.array_equal(out[k], current[k]) for k in current if k != b_key(V))
    with pytest.raises(ValueError, match="not in the global"):
        merge(current, {"x": np.zeros(1)})
