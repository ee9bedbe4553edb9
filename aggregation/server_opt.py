"""Server optimizers on the aggregated pseudo-gradient (Reddi et al. 2021, "Adaptive Federated
Optimization"; Hsu et al. 2019 for FedAvgM).

FedAvg replaces the global model by the clients' mean; a server optimizer instead treats
`delta = aggregated - current` as a pseudo-gradient and takes a step with momentum or an
adaptive (Adam/Yogi/Adagrad) learning rate, which helps under non-IID clients. The step only
needs the aggregate, so it composes with any rule whose output is a plain weighted mean
(including secure aggregation).

Unlike Flower's strategies, which keep m and v on `self`, the state here is an explicit
`ServerOptState` passed in and returned, so the coordinator can checkpoint it with
`state_to_arrays` and resume bit-for-bit with `state_from_arrays`.

Hyperparameters use Flower's names and defaults: eta (server lr), eta_l (client lr; accepted
and ignored here, it is a client setting), beta_1, beta_2, tau; FedAvgM uses
server_learning_rate and server_momentum. Updates follow Flower 1.41, except that FedAdam's
bias correction counts server steps taken with this state (t = 1, 2, ...) where Flower uses
`server_round + 1`; pass `bias_correction=False` for the paper's uncorrected step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

NamedArrays = Mapping[str, np.ndarray]

OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")

DEFAULTS: dict[str, dict[str, float | bool]] = {
    "fedavg": {},
    "fedavgm": {"server_learning_rate": 1.0, "server_momentum": 0.0},
    "fedadam": {"eta": 1e-1, "eta_l": 1e-1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3, "bias_correction": True},
    "fedyogi": {"eta": 1e-2, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"eta": 1e-1, "eta_l": 1e-1, "beta_1": 0.0, "tau": 1e-3},
}


@dataclass
class ServerOptState:
    """First moment m, second moment v (float64, per key) and the number of steps taken."""

    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)
    step: int = 0


def state_to_arrays(state: ServerOptState) -> dict[str, np.ndarray]:
    """Flatten a state to named arrays ("m/<key>", "v/<key>", "step") for a checkpoint."""
    out = {f"m/{k}": np.array(a, copy=True) for k, a in state.m.items()}
    out.update({f"v/{k}": np.array(a, copy=True) for k, a in state.v.items()})
    out["step"] = np.array(state.step, dtype=np.int64)
    return out


def state_from_arrays(arrays: NamedArrays) -> ServerOptState:
    """Inverse of `state_to_arrays`; raises ValueError naming an unexpected key."""
    state = ServerOptState()
    for name, value in arrays.items():
        if name == "step":
            state.step = int(np.asarray(value))
        elif name.startswith("m/"):
            state.m[name[2:]] = np.array(value, dtype=np.float64)
        elif name.startswith("v/"):
            state.v[name[2:]] = np.array(value, dtype=np.float64)
        else:
            raise ValueError(f"server optimizer state: unexpected key {name!r}, expected 'step', 'm/...' or 'v/...'")
    return state


def _hparams(name: str, given: dict) -> dict:
    if name not in DEFAULTS:
        raise ValueError(f"unknown server optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    unknown = sorted(set(given) - set(DEFAULTS[name]))
    if unknown:
        raise ValueError(f"server optimizer {name!r}: unknown hyperparameter {unknown[0]!r}; known: {', '.join(DEFAULTS[name]) or 'none'}")
    return {**DEFAULTS[name], **given}


def _moment(store: dict[str, np.ndarray], key: str, like: np.ndarray, what: str) -> np.ndarray:
    value = store.get(key)
    if value is None:
        return np.zeros(like.shape, dtype=np.float64)
    if value.shape != like.shape:
        raise ValueError(f"server optimizer state {what}[{key}]: shape {value.shape}, expected {like.shape}")
    return value


def apply(
    name: str,
    current: NamedArrays,
    aggregated: NamedArrays,
    state: ServerOptState | None = None,
    *,
    frozen: Iterable[str] = (),
    **hparams,
) -> tuple[dict[str, np.ndarray], ServerOptState]:
    """One server step: return (new global, new state); inputs are not modified.

    delta = aggregated - current, per key, in float64; the new global is cast back to each
    key's dtype in `current`.
      fedavg:     x + delta                          (identity: new global = aggregate)
      fedavgm:    m = mu*m + delta;  x + lr*m         (mu = server_momentum, lr = server_learning_rate)
      fedadam:    m = b1*m + (1-b1)*delta;  v = b2*v + (1-b2)*delta^2
      fedyogi:    m as Adam;  v = v - (1-b2)*delta^2*sign(v - delta^2)
      fedadagrad: m as Adam (b1 = 0 by default);  v = v + delta^2
      adaptive:   x + eta_t * m / (sqrt(v) + tau), eta_t = eta * sqrt(1-b2^t)/(1-b1^t) for
                  Adam with bias correction, else eta.
    Keys in `frozen` are copied from `aggregated` and their m, v left untouched: pass the
    factor the clients did not train (RoLoRA's frozen half), else momentum from earlier rounds
    would keep moving it.
    """
    hp = _hparams(name, hparams)
    if set(current) != set(aggregated):
        diff = sorted(set(current) ^ set(aggregated))
        raise ValueError(f"server optimizer: key {diff[0]} is in only one of current and aggregated")
    state = state if state is not None else ServerOptState()
    frozen = set(frozen)
    step = state.step + 1
    new_m, new_v = dict(state.m), dict(state.v)
    out: dict[str, np.ndarray] = {}
    for key, x_in in current.items():
        agg = np.asarray(aggregated[key])
        if agg.shape != x_in.shape:
            raise ValueError(f"server optimizer: {key}: aggregated shape {agg.shape}, current {x_in.shape}")
        if key in frozen or name == "fedavg":
            out[key] = np.array(agg, dtype=x_in.dtype, copy=True)
            continue
        x = np.asarray(x_in, dtype=np.float64)
        delta = agg.astype(np.float64) - x
        if name == "fedavgm":
            m = hp["server_momentum"] * _moment(state.m, key, x, "m") + delta
            new_m[key] = m
            x = x + hp["server_learning_rate"] * m
        else:
            b1, tau, eta = hp["beta_1"], hp["tau"], hp["eta"]
            m = b1 * _moment(state.m, key, x, "m") + (1.0 - b1) * delta
            v = _moment(state.v, key, x, "v")
            d2 = delta * delta
            if name == "fedadam":
                b2 = hp["beta_2"]
                v = b2 * v + (1.0 - b2) * d2
                if hp["bias_correction"]:
                    eta = eta * np.sqrt(1.0 - b2**step) / (1.0 - b1**step)
            elif name == "fedyogi":
                v = v - (1.0 - hp["beta_2"]) * d2 * np.sign(v - d2)
            else:  # fedadagrad
                v = v + d2
            new_m[key], new_v[key] = m, v
            x = x + eta * m / (np.sqrt(v) + tau)
        out[key] = x.astype(x_in.dtype)
    return out, ServerOptState(m=new_m, v=new_v, step=step)
