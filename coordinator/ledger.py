"""The local-DP privacy ledger: epsilon recomputed by the coordinator, never copied from a client.

A local-DP client reports what its round cost (noise multiplier z, sample rate q, steps) and
its cumulative epsilon. The coordinator keeps, per client (the name `coordinator.directory`
gives the authenticated node), the history [(z, q, steps), ...] of every round it received,
recomputes the cumulative epsilon from it at the run's delta with a fresh RDP accountant
(`finetune.privacy.epsilon_for`, Opacus), and writes both numbers. `epsilon_mismatch` is true
when they differ beyond `rel_tol * |epsilon| + abs_tol`, when the client's delta is not the
run's, or when the client counts more steps than the coordinator saw (a lost round). A
noiseless step makes epsilon infinite (and a reported -3 a mismatch). The histories are part of
the strategy's checkpointed state, so a resumed run keeps accounting where it stopped.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Any

from coordinator.replies import DPReport

log = logging.getLogger("fedsite.coordinator")

REL_TOL = 1e-3
ABS_TOL = 1e-6


def merged(history: list[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """Rounds of equal (noise, sample rate) as one entry: RDP composes linearly in the steps, so
    epsilon is the same, and a client that keeps its settings costs one accountant term."""
    steps: dict[tuple[float, float], int] = {}
    for z, q, s in history:
        steps[(float(z), float(q))] = steps.get((float(z), float(q)), 0) + int(s)
    return tuple((z, q, s) for (z, q), s in steps.items())


def recompute_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Cumulative epsilon of `history` at `delta` (inf when the accountant cannot bound it)."""
    return _epsilon(merged(history) if accountant == "rdp" else tuple(history), float(delta), accountant)


@lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from finetune.privacy import epsilon_for  # torch/opacus are loaded only by runs with local DP

    try:
        epsilon = float(epsilon_for(history, delta, accountant))
    except Exception as err:  # the accountant on client-chosen numbers (e.g. a noise multiplier too small to account)
        log.warning("privacy ledger: epsilon of %s not computable (%s); recorded as unbounded", history[-1:], type(err).__name__)
        return math.inf
    return epsilon if not math.isnan(epsilon) else math.inf


def epsilons_match(recomputed: float, reported: float, rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL) -> bool:
    if math.isinf(recomputed) or math.isinf(reported):
        return recomputed == reported
    return abs(recomputed - reported) <= rel_tol * abs(recomputed) + abs_tol


class PrivacyLedger:
    """Per client, the DP-SGD rounds it reported; ledger lines with the recomputed epsilon."""

    def __init__(self, delta: float | None = None, accountant: str = "rdp") -> None:
        self.delta = delta  # the run's delta; None: take each client's own (tests without a run)
        self.accountant = accountant
        self.history: dict[str, list[tuple[float, float, int]]] = {}

    def entry(self, server_round: int, client: int, node_id: int, report: DPReport, accepted: bool = True) -> dict[str, Any]:
        """Add this round to `client`'s history; the ledger line for it."""
        history = self.history.setdefault(str(client), [])
        history.append((report.noise_multiplier, report.sample_rate, report.steps))
        delta = report.delta if self.delta is None else self.delta
        epsilon = recompute_epsilon(history, delta, self.accountant)
        seen_steps = sum(steps for _, _, steps in history)
        mismatch = not epsilons_match(epsilon, report.epsilon) or delta != report.delta or report.total_steps != seen_steps
        if mismatch:
            log.warning("round %d: client %s reports epsilon %g, recomputed %g (delta %g, %d of its %d steps seen)",
                        server_round, client, report.epsilon, epsilon, delta, seen_steps, report.total_steps)
        return {
            "round": server_round,
            "client": client,
            "node_id": node_id,
            "mechanism": "local-dp-sgd",
            "accountant": self.accountant,
            "noise_multiplier": report.noise_multiplier,
            "sample_rate": report.sample_rate,
            "steps": report.steps,
            "total_steps": report.total_steps,  # as the client counts them
            "seen_steps": seen_steps,  # as the coordinator counted them
            "delta": delta,
            "epsilon": epsilon,  # recomputed from the history above
            "client_epsilon": report.epsilon,
            "epsilon_mismatch": mismatch,
            "update": "accepted" if accepted else "rejected",
        }

    def state_dict(self) -> dict[str, Any]:
        return {"history": {client: [list(step) for step in steps] for client, steps in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {str(c): [(float(z), float(q), int(s)) for z, q, s in steps] for c, steps in state.get("history", {}).items()}
