import numpy as np
import pytest

from aggregation.server_opt import ServerOptState, apply, state_from_arrays, state_to_arrays


def arrays(*values):
    return {"w": np.array(values, dtype=np.float64)}


def test_fedavg_is_identity_on_the_aggregate():
    new, state = apply("fedavg", arrays(1.0, 2.0), arrays(3.0, 5.0))
    np.testing.assert_array_equal(new["w"], [3.0, 5.0])
    assert state.step == 1


def test_fedadam_matches_hand_computed_steps():
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    x0, agg1 = arrays(1.0, -2.0), arrays(1.5, -2.5)
    new1, s1 = apply("fedadam", x0, agg1, None, eta=eta, beta_1=b1, beta_2=b2, tau=tau)
    d = np.array([0.5, -0.5])
    m = 0.1 * d  # (1-b1) * d
    v = 0.01 * d**2  # (1-b2) * d^2
    eta_t = eta * np.sqrt(1 - b2) / (1 - b1)
    # eta_t = 0.1 * sqrt(0.01) / 0.1 = 0.1; m / (sqrt(v) + tau) = ±0.05 / 0.051 = ±1/1.02
    expected1 = np.array([1.0, -2.0]) + eta_t * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(new1["w"], expected1, rtol=1e-12)
    np.testing.assert_allclose(new1["w"], [1.0 + 0.1 / 1.02, -2.0 - 0.1 / 1.02], rtol=1e-12)
    np.testing.assert_allclose(s1.m["w"], m)
    np.testing.assert_allclose(s1.v["w"], v)
    assert s1.step == 1

    # second step: state carries over, bias correction uses t=2
    agg2 = {"w": new1["w"] + np.array([0.2, 0.0])}
    new2, s2 = apply("fedadam", new1, agg2, s1, eta=eta, beta_1=b1, beta_2=b2, tau=tau)
    d2 = np.array([0.2, 0.0])
    m2 = b1 * m + (1 - b1) * d2
    v2 = b2 * v + (1 - b2) * d2**2
    eta_t2 = eta * np.sqrt(1 - b2**2) / (1 - b1**2)
    np.testing.assert_allclose(new2["w"], new1["w"] + eta_t2 * m2 / (np.sqrt(v2) + tau), rtol=1e-12)
    assert s2.step == 2


def test_fedadam_without_bias_correction_is_the_paper_step():
    new, _ = apply("fedadam", arrays(0.0), arrays(1.0), eta=1.0, beta_1=0.0, beta_2=0.0, tau=0.0, bias_correction=False)
    np.testing.assert_allclose(new["w"], [1.0])  # m = v**0.5 = 1


def test_fedyogi_and_fedadagrad_second_moments():
    x, agg = arrays(0.0), arrays(2.0)  # delta = 2, delta^2 = 4
    _, s = apply("fedyogi", x, agg, eta=0.01, beta_2=0.99)
    np.testing.assert_allclose(s.v["w"], [0.0 + 0.01 * 4 * 1])  # v - (1-b2) d^2 sign(0 - 4)
    _, s2 = apply("fedyogi", x, agg, s, eta=0.01, beta_2=0.99)
    np.testing.assert_allclose(s2.v["w"], [0.04 + 0.04])
    _, s3 = apply("fedyogi", x, arrays(0.1), s2, eta=0.01, beta_2=0.99)  # v > delta^2: v shrinks additively
    np.testing.assert_allclose(s3.v["w"], [0.08 - 0.01 * 0.01])
    new, s = apply("fedadagrad", x, agg, eta=0.1, tau=0.0)
    np.testing.assert_allclose(s.v["w"], [4.0])
    np.testing.assert_allclose(new["w"], [0.0 + 0.1 * 2.0 / 2.0])  # beta_1 = 0: m = delta
    _, s = apply("fedadagrad", x, arrays(1.0), s, eta=0.1, tau=0.0)
    np.testing.assert_allclose(s.v["w"], [4.0 + 1.0])  # Adagrad accumulates


def test_fedavgm_momentum_accumulates():
    x = arrays(0.0)
    new1, s = apply("fedavgm", x, arrays(1.0), server_momentum=0.5, server_learning_rate=1.0)
    np.testing.assert_allclose(new1["w"], [1.0])
    new2, s = apply("fedavgm", new1, arrays(2.0), s, server_momentum=0.5, server_learning_rate=1.0)
    np.testing.assert_allclose(new2["w"], [1.0 + (0.5 * 1.0 + 1.0)])
    np.testing.assert_allclose(s.m["w"], [1.5])


def test_frozen_keys_are_copied_and_their_state_kept():
    cur = {"a": np.array([0.0]), "b": np.array([0.0])}
    _, s = apply("fedavgm", cur, {"a": np.array([1.0]), "b": np.array([1.0])}, server_momentum=0.9)
    new, s2 = apply("fedavgm", cur, {"a": np.array([0.0]), "b": np.array([0.0])}, s, server_momentum=0.9, frozen=["b"])
    np.testing.assert_allclose(new["a"], [0.9])  # momentum keeps moving a trained key
    np.testing.assert_allclose(new["b"], [0.0])  # but not a frozen one
    np.testing.assert_allclose(s2.m["b"], s.m["b"])


def test_inputs_not_mutated_and_dtype_kept():
    cur = {"w": np.ones(3, dtype=np.float32)}
    agg = {"w": np.full(3, 2.0, dtype=np.float32)}
    state = ServerOptState()
    new, _ = apply("fedadam", cur, agg, state)
    assert new["w"].dtype == np.float32
    np.testing.assert_array_equal(cur["w"], 1.0)
    assert state.step == 0 and state.m == {}


def test_state_round_trips_through_named_arrays():
    cur = {"x.lora_A.weight": np.zeros((2, 3)), "x.lora_B.weight": np.ones((3, 2))}
    agg = {k: v + 0.3 for k, v in cur.items()}
    _, s = apply("fedadam", cur, agg)
    arrays_ = state_to_arrays(s)
    assert set(arrays_) == {"m/x.lora_A.weight", "m/x.lora_B.weight", "v/x.lora_A.weight", "v/x.lora_B.weight", "step"}
    back = state_from_arrays(arrays_)
    assert back.step == s.step
    # resuming from the restored state gives bit-identical results
    a, _ = apply("fedadam", agg, cur, s)
    b, _ = apply("fedadam", agg, cur, back)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="unexpected key 'oops'"):
        state_from_arrays({"oops": np.zeros(1)})


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: apply("sgd", arrays(0.0), arrays(1.0)), "unknown server optimizer 'sgd'"),
        (lambda: apply("fedadam", arrays(0.0), arrays(1.0), beta1=0.9), "unknown hyperparameter 'beta1'"),
        (lambda: apply("fedadam", arrays(0.0), {"v": np.zeros(1)}), "only one of"),
        (lambda: apply("fedadam", arrays(0.0), arrays(1.0, 2.0)), "aggregated shape"),
    ],
)
def test_bad_calls_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
