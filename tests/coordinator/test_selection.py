"""Energy-aware selection: the fairness bound, determinism by seed, batteries, preferences."""

import numpy as np
import pytest

from coordinator.selection import Candidate, ClientSelection, battery_draw, must_take
from protos.profile import DeviceProfile

GREEN = DeviceProfile("green", train_watts=5.0, carbon_intensity=20.0)
DIRTY = DeviceProfile("dirty", train_watts=30.0, carbon_intensity=800.0)
PHONE = DeviceProfile("phone", train_watts=3.0, battery_wh=0.01, carbon_intensity=300.0)


def population(n: int, seed: int = 0) -> list[Candidate]:
    kinds = (GREEN, DIRTY, PHONE)
    picks = np.random.default_rng(seed).integers(0, 3, n)
    return [Candidate(i, 1000 + i, kinds[k]) for i, k in enumerate(picks)]


def run(selection: ClientSelection, candidates: list[Candidate], rounds: int, slots: int) -> list[list[int]]:
    history = []
    for t in range(1, rounds + 1):
        chosen = selection.choose(t, candidates, [c.node for c in candidates[:slots]], update_mb=0.1)
        history.append(chosen)
        for c in candidates:
            if c.node in chosen:
                selection.spend(c.key, c.profile, c.profile.train_watts * 2.0, 2.0)
    return history


@pytest.mark.parametrize("clients,slots,window", [(20, 5, 4), (20, 5, 6), (13, 3, 5), (10, 1, 10), (12, 2, 3)])
def test_every_client_is_selected_at_least_once_every_k_rounds(clients, slots, window):
    candidates = population(clients)
    history = run(ClientSelection("energy-aware", window, seed=1, clients=clients), candidates, 30, slots)
    for c in candidates:
        rounds = [t for t, chosen in enumerate(history, start=1) if c.node in chosen]
        gaps = np.diff([0, *rounds, 31])[:-1]  # from the start, between selections
        assert rounds and gaps.max() <= window, (c, rounds)
        assert 31 - rounds[-1] <= window  # and no window without it at the end
    if slots * window >= clients:
        assert all(len(chosen) == slots for chosen in history)  # feasible: never more than asked


def test_the_bound_wins_over_the_slot_count_when_it_must():
    candidates = population(10)
    history = run(ClientSelection("energy-aware", 2, seed=0, clients=10), candidates, 6, 2)  # 2 x 2 < 10
    for c in candidates:
        rounds = [t for t, chosen in enumerate(history, start=1) if c.node in chosen]
        assert np.diff([0, *rounds]).max() <= 2


def test_must_take_counts_the_earliest_deadlines():
    assert must_take({1: 3, 2: 3, 3: 3}, 1, 1, 3) == 1  # three due by round 3, one slot a round: one now
    assert must_take({1: 1, 2: 5}, 1, 4, 5) == 1
    assert must_take({1: 9, 2: 9}, 1, 4, 5) == 0


def test_deterministic_by_seed():
    candidates = population(20)
    a = run(ClientSelection("energy-aware", 4, seed=3, clients=20), candidates, 10, 5)
    b = run(ClientSelection("energy-aware", 4, seed=3, clients=20), candidates, 10, 5)
    assert a == b
    assert battery_draw(3, 7) == battery_draw(3, 7) != battery_draw(4, 7)


def test_prefers_low_carbon_and_charged_batteries():
    candidates = [Candidate(0, 10, DIRTY), Candidate(1, 11, GREEN), Candidate(2, 12, DIRTY), Candidate(3, 13, GREEN)]
    selection = ClientSelection("energy-aware", 10, seed=0, clients=4)
    assert sorted(selection.choose(1, candidates, [10, 11], 0.1)) == [11, 13]
    flat, charged = Candidate(0, 20, PHONE), Candidate(1, 21, PHONE)
    selection = ClientSelection("energy-aware", 10, battery_threshold=0.5, seed=0, clients=2)
    selection.level = {0: 0.001, 1: 0.009}  # 10% and 90% of 0.01 Wh
    assert selection.choose(1, [flat, charged], [20], 0.1) == [21]


def test_battery_drains_with_energy_spent_and_recovers_while_idle():
    phone = Candidate(0, 5, PHONE)
    selection = ClientSelection("uniform", seed=0, clients=2)
    start = selection.battery_fraction(phone) * PHONE.battery_wh
    selection.choose(1, [phone], [5], 0.1)
    selection.spend(0, PHONE, 18.0, 6.0)  # 18 J = 0.005 Wh
    assert selection.level[0] == pytest.approx(max(0.0, start - 0.005))
    drained = selection.level[0]
    selection.choose(2, [phone], [], 0.1)  # idle this round
    assert selection.level[0] == pytest.approx(min(PHONE.battery_wh, drained + battery_draw(0, 0)[1] * PHONE.battery_wh))


def test_uniform_keeps_flowers_sample_and_reports_fairness():
    candidates = population(4)
    selection = ClientSelection("uniform", clients=4)
    assert selection.choose(1, candidates, [1001, 1003], 0.1) == [1001, 1003]
    record = selection.round_record()
    assert record["jain_index"] == pytest.approx(0.5)  # two of four clients once each: 4 / (4 * 2)


def test_state_round_trips():
    selection = ClientSelection("energy-aware", 4, seed=2, clients=20)
    candidates = population(20)
    run(selection, candidates, 3, 5)
    again = ClientSelection("energy-aware", 4, seed=2, clients=20)
    again.load_state_dict(selection.state_dict())
    assert run(again, candidates, 3, 5) == run(selection, candidates, 3, 5)


# ------------------------------------------------------------------ through the strategy
@pytest.mark.parametrize("simulated_gflops,compute_joules", [(0.0, 20.0), (4.0, 40.0)])
def test_strategy_selects_energy_aware_within_the_bound_and_accounts_energy(tmp_path, simulated_gflops, compute_joules):
    import json

    from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    from coordinator.results import RunRecorder
    from coordinator.strategy import FedsiteStrategy
    from finetune.config import FedsiteConfig
    from protos.tensors import to_array_record
    from protos.updates import encode_update
    from tests.coordinator.test_strategy import GLOBAL, QueryGrid, full

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    config = FedsiteConfig(clients=8, fraction_train=0.25, min_train_clients=2, client_selection="energy-aware", selection_fairness_rounds=4,
                            simulated_gflops=simulated_gflops)
    strategy = FedsiteStrategy(RunRecorder(tmp_path, config), fraction_train=0.25, fraction_evaluate=0.0, min_train_clients=2)
    grid = QueryGrid(list(range(10, 18)))
    chosen_by_round = []
    for t in range(1, 9):
        messages = list(strategy.configure_train(t, to_array_record(GLOBAL), ConfigRecord(config.to_flat()), grid))
        assert len(messages) == 2 and all(m.metadata.message_type == MessageType.TRAIN and "arrays" in m.content for m in messages)
        chosen_by_round.append({m.metadata.dst_node_id for m in messages})
        replies = []
        for m in messages:
            payload = encode_update(full(1.0), GLOBAL)
            metrics = MetricRecord({"num-examples": 10, "train-seconds": 2.0, "train-gflops": 16.0, "upload-bytes": 48})
            replies.append(Message(RecordDict({"arrays": to_array_record(payload), "metrics": metrics}), reply_to=m))
        strategy.aggregate_train(t, replies)
        strategy.recorder.finish_round(t, {"eval_loss": 0.0})
    for node in grid.nodes:
        rounds = [t for t, chosen in enumerate(chosen_by_round, start=1) if node in chosen]
        assert np.diff([0, *rounds, 9])[:].max() <= 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    clients = [json.loads(line) for line in (tmp_path / "clients.jsonl").read_text().splitlines() if "energy_joules" in line]
    # bytes as they travel: the serialized arrays of the records sent and received
    sent = sum(len(a.data) for a in to_array_record(GLOBAL).values())
    upload = sum(len(a.data) for a in to_array_record(encode_update(full(1.0), GLOBAL)).values())
    # default profile: 10 W x (2 s measured, or 16 GFLOPs / 4 GFLOP/s) + 1 J/MB x upload + 0.5 J/MB x download
    assert clients[0]["compute_joules"] == pytest.approx(compute_joules)
    assert clients[0]["energy_joules"] == pytest.approx(compute_joules + upload / 1e6 + 0.5 * sent / 1e6)
    assert rows[0]["energy_joules"] == pytest.approx(2 * clients[0]["energy_joules"])
    assert rows[-1]["jain_index"] == pytest.approx(1.0) and rows[-1]["client_selection"] == "energy-aware"


def test_config_knobs_are_checked_and_energy_aware_is_refused_with_secure():
    from finetune.config import ConfigError, FedsiteConfig

    assert FedsiteConfig(client_selection="energy-aware", selection_fairness_rounds=3).validate()
    for bad, field in ((dict(client_selection="greedy"), "client-selection"), (dict(selection_fairness_rounds=0), "selection-fairness-rounds"),
                       (dict(selection_battery_threshold=1.5), "selection-battery-threshold"), (dict(selection_fairness_weight=-1.0), "selection-fairness-weight"),
                       (dict(simulated_gflops=float("nan")), "simulated-gflops")):
        with pytest.raises(ConfigError, match=f"^config field '{field}'"):
            FedsiteConfig(**bad).validate()
    with pytest.raises(ConfigError, match="^config field 'client-selection' = 'energy-aware' must be uniform with secure aggregation"):
        FedsiteConfig(client_selection="energy-aware", secure=True).validate()


def test_energy_objective_prefers_the_fewest_joules():
    hungry_green = Candidate(0, 10, DeviceProfile("hydro", train_watts=120.0, carbon_intensity=10.0))
    frugal_dirty = Candidate(1, 11, DeviceProfile("phone", train_watts=3.0, carbon_intensity=700.0))
    assert ClientSelection("energy-aware", 10, clients=2).choose(1, [hungry_green, frugal_dirty], [10], 0.1) == [10]
    assert ClientSelection("energy-aware", 10, clients=2, objective="energy").choose(1, [hungry_green, frugal_dirty], [10], 0.1) == [11]


def test_fairness_weight_spreads_participation_by_cost():
    # two clients at 1 J and one at 4 J per round (mains power), one slot per round, no binding bound
    cheap = [Candidate(k, 10 + k, DeviceProfile(f"cheap{k}", train_watts=1.0, joules_per_mb_sent=0.0, joules_per_mb_received=0.0)) for k in range(2)]
    dear = Candidate(2, 12, DeviceProfile("dear", train_watts=4.0, joules_per_mb_sent=0.0, joules_per_mb_received=0.0))

    def counts(weight: float) -> list[int]:
        selection = ClientSelection("energy-aware", 100, clients=3, objective="energy", fairness_weight=weight)
        for t in range(1, 13):
            selection.choose(t, [*cheap, dear], [10], 0.0)
        return [selection.counts.get(k, 0) for k in range(3)]

    assert counts(0.0) == [6, 6, 0]  # greedy: the cheap ones alternate (idle longest), the dear one never trains
    # g = 1: a client's cost x (1 + n) evens out where n is proportional to 1/cost: 4 J x 1 ties 1 J x 4
    spread = counts(1.0)
    assert sum(spread) == 12 and spread[2] >= 1 and abs(spread[0] - spread[1]) <= 1 and spread[0] > spread[2]
    with pytest.raises(ValueError, match="selection-fairness-weight"):
        ClientSelection("energy-aware", fairness_weight=-0.5)
