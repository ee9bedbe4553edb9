"""The registry of aggregation rules the coordinator can be configured with, by name.

Declarative on purpose: each `RuleSpec` says which function aggregates, which server
optimizer (if any) runs on its output, what inputs it needs, and whether it works with
secure aggregation. A rule is secure-compatible only if the server needs nothing but the
weighted sum of the clients' (masked) arrays; rules that look at individual updates
(median, trimmed mean, FedEx-LoRA's products, FLoRA's factors, HetLoRA's per-client ranks)
are not. The calls differ (some need the round or the current global), so each spec carries
a one-line `call` saying how the coordinator invokes it; `inputs` lists the same names for
programmatic dispatch. Validate updates first (`aggregation.validate.partition_valid`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aggregation.fedavg import weighted_mean
from aggregation.hetero_rank import flora_stack, hetlora
from aggregation.lora import fedex_lora, ffa_lora, rolora
from aggregation.robust import coordinate_median, trimmed_mean


@dataclass(frozen=True)
class RuleSpec:
    """One aggregation rule: name, what it does, and how the coordinator calls it."""

    name: str
    description: str
    secure_compatible: bool
    aggregate: Callable
    inputs: tuple[str, ...]
    call: str
    server_optimizer: str | None = None


_MEAN = ("updates", "weights")
_OPT_CALL = (
    "agg = weighted_mean(updates, weights); "
    "new_global, state = server_opt.apply({opt!r}, current, agg, state, **hparams); checkpoint state_to_arrays(state)"
)


def _opt(name: str, description: str) -> RuleSpec:
    return RuleSpec(name, description, True, weighted_mean, _MEAN, _OPT_CALL.format(opt=name), server_optimizer=name)


_SPECS = [
    RuleSpec(
        "fedavg", "example-weighted mean of the arrays (McMahan et al. 2017)", True, weighted_mean, _MEAN,
        "new_global = weighted_mean(updates, weights)",
    ),
    RuleSpec(
        "fedprox", "FedAvg on the server; clients add the proximal term mu/2·||w - w_global||^2 (Li et al. 2020)",
        True, weighted_mean, _MEAN, "new_global = weighted_mean(updates, weights); send proximal-mu to clients",
    ),
    _opt("fedavgm", "FedAvg + server momentum on the pseudo-gradient (Hsu et al. 2019)"),
    _opt("fedadam", "FedAvg + server Adam on the pseudo-gradient (Reddi et al. 2021)"),
    _opt("fedyogi", "FedAvg + server Yogi on the pseudo-gradient (Reddi et al. 2021)"),
    RuleSpec(
        "ffa-lora", "A frozen at a shared init, average B only: exact product (Sun et al. 2024)", True, ffa_lora, _MEAN,
        "new_global = ffa_lora(updates, weights); clients freeze every lora_A",
    ),
    RuleSpec(
        "fedex-lora", "average A and B, fold the exact residual into the base weight (Singhal et al. 2024)", False,
        fedex_lora, (*_MEAN, "scaling"),
        "factors, residual = fedex_lora(updates, weights, scaling=alpha/r); new_global = factors; base[prefix] += residual[prefix]",
    ),
    RuleSpec(
        "rolora", "alternate rounds train only A (odd) or only B (even): exact product (Chen et al. 2024)", True,
        rolora, (*_MEAN, "round", "current"),
        "new_global = rolora(updates, weights, round, current); clients train rolora_trainable(round); "
        "with a server optimizer pass frozen=factor_keys(current, other factor)",
    ),
    RuleSpec(
        "hetlora", "heterogeneous ranks: zero-pad to the max rank, average, truncate per client (Cho et al. 2024)",
        False, hetlora, (*_MEAN, "max_rank"),
        "new_global = hetlora(updates, weights, max_rank); client i gets truncate_to_rank(new_global, r_i)",
    ),
    RuleSpec(
        "flora", "heterogeneous ranks: stack weighted factors, exact product of rank sum r_i (Wang et al. 2024)",
        False, flora_stack, (*_MEAN, "scalings"),
        "stacked = flora_stack(updates, weights, scalings=[alpha_i/r_i]); base[prefix] += product(stacked)[prefix]; "
        "clients re-initialise their adapters",
    ),
    RuleSpec(
        "median", "coordinate-wise median, robust to a minority of arbitrary updates (Yin et al. 2018)", False,
        coordinate_median, ("updates",), "new_global = coordinate_median(updates)  # unweighted",
    ),
    RuleSpec(
        "trimmed-mean", "coordinate-wise mean after trimming a beta fraction from each side (Yin et al. 2018)", False,
        trimmed_mean, ("updates", "beta"), "new_global = trimmed_mean(updates, beta)  # unweighted",
    ),
]

RULES: dict[str, RuleSpec] = {spec.name: spec for spec in _SPECS}


def get_rule(name: str) -> RuleSpec:
    """The spec registered as `name`; ValueError listing the known names otherwise."""
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown aggregation rule {name!r}; known: {', '.join(RULES)}") from None


def check_secure(name: str) -> RuleSpec:
    """Return the spec if `name` can run under secure aggregation, else raise ValueError."""
    spec = get_rule(name)
    if not spec.secure_compatible:
        raise ValueError(f"aggregation rule {name!r} needs individual updates and cannot run with secure aggregation")
    return spec
