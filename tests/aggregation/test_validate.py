import numpy as np
import pytest

from aggregation.validate import global_l2_norm, partition_valid, validate_update

from tests.aggregation.helpers import HEAD, a_key, b_key, lora_update


@pytest.fixture()
def ref():
    return lora_update(np.random.default_rng(0))


def good(ref):
    return {k: v + np.float32(0.01) for k, v in ref.items()}


def test_good_update_passes(ref):
    assert validate_update(good(ref), ref) is None
    assert validate_update(good(ref), ref, max_norm=1e6, max_bytes=10**6) is None


def _with(ref, key, value):
    u = good(ref)
    u[key] = value
    return u


@pytest.mark.parametrize(
    ("mutate", "key", "words"),
    [
        (lambda r: _with(r, "extra.lora_A.weight", np.zeros(2, np.float32)), "extra.lora_A.weight", "unknown key"),
        (lambda r: {k: v for k, v in good(r).items() if k != b_key()}, b_key(), "missing key"),
        (lambda r: _with(r, a_key(), np.zeros((3, 6), np.float32)), a_key(), "shape (3, 6), expected (2, 6)"),
        (lambda r: _with(r, a_key(), r[a_key()].astype(np.float64)), a_key(), "dtype float64, expected float32"),
        (lambda r: _with(r, HEAD, np.where(np.eye(3, 4) > 0, np.nan, r[HEAD]).astype(np.float32)), HEAD, "NaN or Inf"),
        (lambda r: _with(r, b_key(), np.full((4, 2), np.inf, np.float32)), b_key(), "NaN or Inf (8 of 8"),
        (lambda r: _with(r, a_key(), r[a_key()].tolist()), a_key(), "expected a numpy array"),
    ],
)
def test_each_structural_failure_names_the_key(ref, mutate, key, words):
    reason = validate_update(mutate(ref), ref)
    assert reason is not None and key in reason and words in reason
    assert "\n" not in reason


def test_norm_bound_names_the_largest_key(ref):
    u = good(ref)
    u[HEAD] = u[HEAD] * 1000
    norm = global_l2_norm(u)
    reason = validate_update(u, ref, max_norm=norm * 0.99)
    assert reason is not None and "global L2 norm" in reason and "exceeds bound" in reason and HEAD in reason
    assert validate_update(u, ref, max_norm=norm * 1.01) is None


def test_relative_norm_measures_the_delta(ref):
    u = good(ref)  # every entry moved by 0.01
    n_entries = sum(v.size for v in ref.values())
    delta_norm = 0.01 * np.sqrt(n_entries)
    assert global_l2_norm(u, ref) == pytest.approx(delta_norm, rel=1e-4)
    assert validate_update(u, ref, max_norm=delta_norm * 1.01, relative=True) is None
    assert validate_update(u, ref, max_norm=delta_norm * 1.01) is not None  # absolute norm is far larger
    reason = validate_update(u, ref, max_norm=delta_norm * 0.5, relative=True)
    assert reason is not None and "delta L2 norm" in reason


def test_size_limit_names_the_largest_key(ref):
    total = sum(v.nbytes for v in ref.values())
    assert validate_update(good(ref), ref, max_bytes=total) is None
    reason = validate_update(good(ref), ref, max_bytes=total - 1)
    assert reason is not None and f"size {total} bytes exceeds limit {total - 1}" in reason
    largest = max(ref, key=lambda k: ref[k].nbytes)
    assert largest in reason


def test_non_mapping_update_is_rejected_not_raised(ref):
    assert "expected a mapping" in validate_update([1, 2], ref)


def test_partition_valid_keeps_order_and_reasons(ref):
    bad = _with(ref, a_key(), np.zeros((1, 1), np.float32))
    accepted, rejected = partition_valid([("c1", good(ref)), ("c2", bad), ("c3", good(ref))], ref, max_norm=1e6)
    assert [c for c, _ in accepted] == ["c1", "c3"]
    assert len(rejected) == 1 and rejected[0][0] == "c2" and a_key() in rejected[0][1]
