"""Kill-and-Revive at the coordinator: seeded selection, killing, revival, and the partial aggregate."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from coordinator.aggregate import Aggregator
from coordinator.module_selection import KillRevive, gradient_scores, kill_revive, module_scores, selection_for, with_selections
from coordinator.results import RunRecorder
from coordinator.strategy import FedsiteStrategy
from finetune.config import ConfigError, FedsiteConfig
from protos.selection import GRAD_NORMS_KEY, decode_selection, keys_of
from protos.tensors import from_array_record, to_array_record
from protos.updates import encode_update

MODULES = [f"m.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]


def arrays(value: float = 0.0) -> dict:
    out = {}
    for m in MODULES:
        out[f"{m}.lora_A.weight"] = np.full((2, 3), value, np.float32)
        out[f"{m}.lora_B.weight"] = np.full((3, 2), value, np.float32)
    return out


def run_rounds(selector: KillRevive, rounds: int, sensitivity: dict[str, float]) -> list[list[str]]:
    """Rounds of selection, each active module moving by its fixed `sensitivity`."""
    chosen = []
    for r in range(1, rounds + 1):
        active = selector.active(r)
        chosen.append(active)
        old = arrays()
        new = {k: v + (sensitivity[k.rsplit(".lora_", 1)[0]] if k.rsplit(".lora_", 1)[0] in active else 0) for k, v in old.items()}
        selector.observe(old, new)
    return chosen


SENSITIVITY = {m: float(i + 1) for i, m in enumerate(MODULES)}  # the last modules matter most


def test_selection_and_revival_are_deterministic_by_seed():
    first = run_rounds(KillRevive(MODULES, 0.25, revive_every=3, seed=5), 12, SENSITIVITY)
    again = run_rounds(KillRevive(MODULES, 0.25, revive_every=3, seed=5), 12, SENSITIVITY)
    other = run_rounds(KillRevive(MODULES, 0.25, revive_every=3, seed=6), 12, SENSITIVITY)
    assert first == again
    assert first != other  # the seed orders unscored modules and ties
    assert all(len(active) == 2 for active in first)


def test_every_module_is_tried_before_any_is_killed_then_the_small_ones_are_killed():
    chosen = run_rounds(KillRevive(MODULES, 0.25, revive_every=0, seed=0), 8, SENSITIVITY)
    assert sorted(m for active in chosen[:4] for m in active) == sorted(MODULES)  # 4 rounds x 2 cover all 8
    top = sorted(MODULES, key=SENSITIVITY.__getitem__)[-2:]
    assert all(active == top for active in chosen[4:])  # no revival: the two largest updates stay


def test_revival_brings_back_the_longest_killed_modules_every_k_rounds():
    selector = KillRevive(MODULES, 0.5, revive_every=3, seed=1)
    chosen = run_rounds(selector, 9, SENSITIVITY)
    top = sorted(MODULES, key=SENSITIVITY.__getitem__)[-4:]
    assert chosen[3] == top and chosen[4] == top  # rounds 4 and 5: the most sensitive half
    revived = set(chosen[5]) - set(top)  # round 6 revives half the slots
    assert len(revived) == 2 and revived <= set(MODULES) - set(top)
    last_active_before = {m: max((r for r, a in enumerate(chosen[:5], 1) if m in a), default=0) for m in set(MODULES) - set(top)}
    assert all(last_active_before[m] == min(last_active_before.values()) for m in revived)
    assert set(top) - set(chosen[5]) == set(sorted(top, key=SENSITIVITY.__getitem__)[:2])  # the weakest of the active make room


def test_scores_are_the_norm_of_each_modules_aggregated_update():
    old, new = arrays(), arrays()
    new[f"{MODULES[0]}.lora_B.weight"] += 2.0  # 6 values
    scores = module_scores(old, new, MODULES[:2])
    assert scores[MODULES[0]] == pytest.approx(np.sqrt(6 * 4.0)) and scores[MODULES[1]] == 0.0
    assert module_scores(old, new, MODULES[:1], "update-rms")[MODULES[0]] == pytest.approx(np.sqrt(24.0 / 12))


def test_a_checkpointed_selector_resumes_with_the_same_scores():
    selector = KillRevive(MODULES, 0.25, seed=2)
    run_rounds(selector, 5, SENSITIVITY)
    resumed = KillRevive(MODULES, 0.25, seed=2)
    resumed.load_state_dict(json.loads(json.dumps(selector.state_dict())))
    assert resumed.active(6) == selector.active(6)


def test_the_config_refuses_what_cannot_take_partial_updates():
    FedsiteConfig(module_selection="kill-revive", aggregation="fedadam").validate()
    for changes, field in [({"aggregation": "hetlora"}, "aggregation"), ({"aggregation": "fedex-lora"}, "aggregation"), ({"emulator_share": 0.5}, "emulator-share"),
                           ({"kr_active_share": 0.0}, "kr-active-share"), ({"kr_score": "magic"}, "kr-score"), ({"kr_revive_every": -1}, "kr-revive-every")]:
        with pytest.raises(ConfigError, match=field):
            FedsiteConfig(module_selection="kill-revive", **changes).validate()
    with pytest.raises(ConfigError, match="module-selection"):
        FedsiteConfig(module_selection="some").validate()
    assert selection_for(FedsiteConfig(), arrays()) is None


def test_a_lowest_block_keeps_the_blocks_below_it_killed_through_scoring_and_revival():
    # blocks 0-1 may not train, however sensitive: SENSITIVITY favours the top, so invert it
    bottom_heavy = {m: float(len(MODULES) - i) for i, m in enumerate(MODULES)}
    for assign in ("shared", "per-client"):
        selector = KillRevive(MODULES, 0.25, revive_every=2, seed=0, assign=assign, lowest_block=2)
        assert selector.candidates == MODULES[4:] and selector.count == 2
        for r in range(1, 9):
            active = selector.active(r) if assign == "shared" else selector.active_for(r, 3)
            assert active and all(int(m.split(".layers.")[1].split(".")[0]) >= 2 for m in active)
            old = arrays()
            new = {k: v + (bottom_heavy[k.rsplit(".lora_", 1)[0]] if k.rsplit(".lora_", 1)[0] in active else 0) for k, v in old.items()}
            selector.observe(old, new)
            selector.observe_clients(old, {3: {k: new[k] for k in keys_of(new, active)}})
        assert selector.record()["lowest_active_layer"] >= 2 and selector.record()["kr_lowest_block"] == 2
    # the share counts every module but is capped at those left: 75% of 8 = 6, only 4 in blocks 2-3
    assert KillRevive(MODULES, 0.75, lowest_block=2).count == 4
    top_only = selection_for(FedsiteConfig(module_selection="kill-revive", kr_lowest_block=3), arrays()).active(1)
    assert top_only and all(".layers.3." in m for m in top_only)
    with pytest.raises(ValueError, match="kr-lowest-block 4: the adapter has no LoRA module at or above that block \\(its blocks are 0-3\\)"):
        selection_for(FedsiteConfig(module_selection="kill-revive", kr_lowest_block=4), arrays())
    with pytest.raises(ConfigError, match="kr-lowest-block"):
        FedsiteConfig(module_selection="kill-revive", kr_lowest_block=-1).validate()


# ---------------------------------------------------------------- the strategy's round


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def reply(node: int, trained: dict, examples: int, **extra) -> Message:
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    payload = encode_update(trained, {k: arrays()[k] for k in trained}, "fp32")
    content = RecordDict({"arrays": to_array_record(payload), "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, **extra})})
    return Message(content=content, reply_to=request)


def strategy_round(tmp_path, rule: str, replies_for) -> tuple[FedsiteStrategy, dict, dict, list[str]]:
    config = FedsiteConfig(module_selection="kill-revive", kr_active_share=0.25, aggregation=rule)
    strategy = FedsiteStrategy(RunRecorder(tmp_path, config), Aggregator(rule, server_lr=0.5), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2, max_update_norm=0)
    strategy.module_selection = selection_for(config, arrays())
    strategy._global = arrays()
    active = decode_selection(strategy.module_selection.message_value(1), MODULES)
    out, _ = strategy.aggregate_train(1, replies_for(keys_of(arrays(), active)))
    strategy.recorder.finish_round(1, {"eval_loss": 1.0})
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    return strategy, from_array_record(out), row, active


def test_replies_with_exactly_the_selected_modules_are_averaged_and_the_rest_left_alone(tmp_path):
    def replies(keys):
        good = [reply(2, {k: np.full(arrays()[k].shape, 1.0, np.float32) for k in keys}, 10), reply(3, {k: np.full(arrays()[k].shape, 4.0, np.float32) for k in keys}, 30)]
        extra = reply(4, {k: np.full(v.shape, 9.0, np.float32) for k, v in arrays().items()}, 10)  # every module: more than selected
        missing = reply(5, {keys[0]: np.full(arrays()[keys[0]].shape, 9.0, np.float32)}, 10)  # one factor short
        return [*good, extra, missing]

    strategy, out, row, active = strategy_round(tmp_path, "fedavg", replies)
    for key, value in out.items():
        expected = 3.25 if key in keys_of(arrays(), active) else 0.0
        assert np.all(value == np.float32(expected)), key
    assert row["contributors"] == [2, 3]
    assert strategy.module_selection.record() == {"module_selection": "kill-revive", "kr_assign": "shared", "kr_lowest_block": 0, "active_modules": active, "active_share": 0.25,
                                           "active_layers": sorted({int(m.split(".")[2]) for m in active}), "lowest_active_layer": min(int(m.split(".")[2]) for m in active)}
    reasons = {r["client"]: r["reason"] for r in row["rejected"]}
    assert reasons[4].startswith("unknown key") and reasons[5].startswith("missing key")
    assert strategy.module_selection.scores.keys() == set(active)  # scored from the aggregate
    assert strategy.state_dict()["module_selection"]["scores"] == strategy.module_selection.scores


@pytest.mark.parametrize("rule", ["fedadam", "fedavgm", "ffa-lora"])
def test_rules_and_server_optimizers_touch_only_the_updated_modules(tmp_path, rule):
    def replies(keys):
        def trained(value):  # FFA-LoRA clients leave A as it was
            return {k: (arrays()[k] if rule == "ffa-lora" and "lora_A" in k else np.full(arrays()[k].shape, value, np.float32)) for k in keys}
        return [reply(2, trained(1.0), 10), reply(3, trained(2.0), 10)]

    strategy, out, row, active = strategy_round(tmp_path, rule, replies)
    selected = keys_of(arrays(), active)
    assert all(np.array_equal(out[k], arrays()[k]) for k in out if k not in selected)
    moved = [k for k in selected if not np.array_equal(out[k], arrays()[k])]
    assert moved and all("lora_B" in k for k in moved) == (rule == "ffa-lora")
    if rule != "ffa-lora":
        assert set(strategy.aggregator.state.m) == set(selected)  # no moments for killed modules


# ---------------------------------------------------------------- per-client selection


def test_per_client_selections_are_seeded_per_client_and_cover_more_of_the_adapter():
    def picks(seed):
        selector = KillRevive(MODULES, 0.25, seed=seed, assign="per-client")
        return {c: selector.active_for(1, c) for c in range(4)}

    first = picks(3)
    assert first == picks(3) and first != picks(4)
    assert all(len(a) == 2 for a in first.values())
    assert len({tuple(a) for a in first.values()}) > 1  # clients do not all get the same modules
    shared = KillRevive(MODULES, 0.25, seed=3)
    assert len(set().union(*map(set, first.values()))) > len(shared.active(1))


def test_per_client_scores_come_from_each_clients_own_update_and_drive_its_next_selection():
    selector = KillRevive(MODULES, 0.25, revive_every=0, seed=0, assign="per-client")
    for r in range(1, 5):  # 4 rounds x 2 modules: client 7 tries every module once
        active = selector.active_for(r, 7)
        old = arrays()
        new = {k: v + (SENSITIVITY[k.rsplit(".lora_", 1)[0]] if k.rsplit(".lora_", 1)[0] in active else 0) for k, v in old.items()}
        selector.observe(old, new)  # a no-op for per-client selection
        selector.observe_clients(old, {7: {k: new[k] for k in keys_of(new, active)}})
    assert selector.scores == {} and set(selector.client_scores[7]) == set(MODULES)
    top = sorted(MODULES, key=SENSITIVITY.__getitem__)[-2:]
    assert selector.active_for(5, 7) == top
    assert selector.active_for(5, 8) != top or len(selector.client_scores) == 1  # client 8 is new: its own seeded order
    assert selector.current_for(7) == top and selector.current_for(99) == []
    record = selector.record()
    assert record["kr_assign"] == "per-client" and record["active_by_client"]["7"] == top and record["active_share"] == 0.25
    again = KillRevive(MODULES, 0.25, revive_every=0, seed=0, assign="per-client")
    again.load_state_dict(json.loads(json.dumps(selector.state_dict())))
    assert again.client_scores == selector.client_scores and again.client_last_active == selector.client_last_active


def test_a_federation_prior_ranks_a_new_clients_modules_by_the_other_clients_scores():
    selector = KillRevive(MODULES, 0.25, revive_every=0, seed=0, assign="per-client", prior="federation")
    selector.client_scores = {1: {MODULES[0]: 1.0, MODULES[5]: 6.0, MODULES[6]: 1.0}, 2: {MODULES[5]: 2.0, MODULES[3]: 5.0, MODULES[6]: 9.0}}
    assert selector.federation_scores() == {MODULES[0]: 1.0, MODULES[5]: 4.0, MODULES[6]: 5.0, MODULES[3]: 5.0}
    unscored = {MODULES[1], MODULES[2], MODULES[4], MODULES[7]}
    assert set(selector.active_for(1, 3)) <= unscored  # modules no client has scored come first
    for m in unscored:
        selector.client_scores[1][m] = 0.5
    assert selector.active_for(2, 3) == [MODULES[3], MODULES[6]]  # new client 3: the federation's top two (5.0, 5.0)
    selector.client_scores[3] = {MODULES[3]: 0.1, MODULES[6]: 0.2}  # its own scores replace the prior for what it trained
    assert selector.active_for(3, 3) == [MODULES[0], MODULES[5]]  # 3 and 6 fall to its own 0.1 and 0.2; 0 (1.0) and 5 (4.0) lead
    none = KillRevive(MODULES, 0.25, revive_every=0, seed=0, assign="per-client", client_scores={k: dict(v) for k, v in selector.client_scores.items()})
    explored = kill_revive(MODULES, {}, {}, 2, 3, 0, 0, client=4)  # what new client 4 tries in round 3 with nothing scored
    assert none.active_for(3, 4) == explored  # without a prior the others' scores do not matter to it
    assert selector.active_for(3, 4) == [MODULES[5], MODULES[6]] != explored  # with one it starts from the federation's top two (4.0 and 3.4 now)
    assert selector.record()["kr_prior"] == "federation" and "kr_prior" not in KillRevive(MODULES, 0.25).record()
    assert selection_for(FedsiteConfig(module_selection="kill-revive", kr_assign="per-client", kr_prior="federation"), arrays()).prior == "federation"
    with pytest.raises(ConfigError, match="kr-prior. = .federation. must be none unless kr-assign is per-client"):
        FedsiteConfig(module_selection="kill-revive", kr_prior="federation").validate()
    with pytest.raises(ConfigError, match="kr-prior. = .mean. must be none or federation"):
        FedsiteConfig(module_selection="kill-revive", kr_assign="per-client", kr_prior="mean").validate()


def test_with_selections_gives_each_message_its_clients_modules_and_leaves_the_shared_content_alone():
    selector = KillRevive(MODULES, 0.25, seed=1, assign="per-client")
    content = RecordDict({"config": ConfigRecord({"lr": 0.1})})
    messages = [Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN) for node in (11, 12, 13)]
    out = with_selections(messages, selector, 1, lambda node: node - 10)
    assert [m.metadata.dst_node_id for m in out] == [11, 12, 13] and "active-modules" not in content["config"]
    for msg in out:
        assert msg.content["config"]["lr"] == 0.1
        assert decode_selection(msg.content["config"]["active-modules"], MODULES) == selector.current_for(msg.metadata.dst_node_id - 10)
    assert with_selections(messages, KillRevive(MODULES, 0.25), 1, int) == messages


def test_per_client_round_averages_each_module_over_the_clients_that_sent_it(tmp_path):
    config = FedsiteConfig(module_selection="kill-revive", kr_active_share=0.25, kr_assign="per-client")
    strategy = FedsiteStrategy(RunRecorder(tmp_path, config), Aggregator("fedavg"), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2, max_update_norm=0)
    strategy.module_selection = selection_for(config, arrays())
    strategy._global = arrays()
    selections = {node: keys_of(arrays(), strategy.module_selection.active_for(1, node)) for node in (2, 3)}
    value = {2: 1.0, 3: 4.0}
    replies = [reply(node, {k: np.full(arrays()[k].shape, value[node], np.float32) for k in keys}, 10) for node, keys in selections.items()]
    replies.append(reply(4, {k: np.full(arrays()[k].shape, 9.0, np.float32) for k in selections[2]}, 10))  # never asked: rejected
    out, _ = strategy.aggregate_train(1, replies)
    out = from_array_record(out)
    for key in arrays():
        senders = [node for node, keys in selections.items() if key in keys]
        expected = np.mean([value[n] for n in senders]) if senders else 0.0
        assert np.all(out[key] == np.float32(expected)), key
    assert set(strategy.module_selection.client_scores) == {2, 3}


def test_per_client_assignment_is_refused_where_updates_must_line_up():
    for extra, what in [({"secure": True, "clients": 4}, "shared with secure"), ({"aggregation": "ffa-lora"}, "fedavg or fedprox"), ({"kr_assign": "each"}, "shared or per-client")]:
        with pytest.raises(ConfigError, match=what):
            FedsiteConfig(module_selection="kill-revive", kr_assign=extra.pop("kr_assign", "per-client"), **extra).validate()
    FedsiteConfig(module_selection="kill-revive", kr_assign="per-client", aggregation="fedprox").validate()


def test_gradient_scores_rank_every_module_from_the_clients_normalised_norms_and_never_revive():
    ranked = sorted(MODULES)  # kr-grad-norms come in sorted module order
    assert gradient_scores(MODULES, [0.0] * 8) is None and gradient_scores(MODULES, ()) is None
    assert gradient_scores(MODULES, [1.0] * 4 + [3.0] * 4) == {m: (0.0625 if i < 4 else 0.1875) for i, m in enumerate(ranked)}
    shared = KillRevive(MODULES, 0.25, score="gradient", revive_every=1, seed=0)
    shared.active(1)
    big = {1: [float(i == 2) * 100 + 1 for i in range(8)], 2: [float(i == 5) + 0.01 for i in range(8)]}  # client 1's scale is ignored
    shared.observe(arrays(), arrays(), big)
    assert set(shared.scores) == set(MODULES) and shared.scores[ranked[2]] == pytest.approx((101 / 108 + 0.01 / 1.08) / 2)
    assert shared.active(2) == [m for m in MODULES if m in (ranked[2], ranked[5])]  # the two largest mean scores, revival off
    robust = KillRevive(MODULES, 0.25, score="gradient", seed=0, robust=True)
    robust.active(1)
    robust.observe(arrays(), arrays(), {1: [0.0] * 7 + [1.0], 2: [1.0] * 8, 3: [1.0] * 8})  # client 1 puts all its mass on one module
    assert robust.scores[ranked[7]] == 0.125 and robust.scores[ranked[0]] == 0.125  # the median: its say is bounded
    assert selection_for(FedsiteConfig(module_selection="kill-revive", kr_score="gradient", aggregation="median"), arrays()).robust
    shared.observe(arrays(), arrays(), {3: [0.0] * 8})  # no signal: the scores stay
    assert shared.scores[ranked[2]] == pytest.approx((101 / 108 + 0.01 / 1.08) / 2)
    per = KillRevive(MODULES, 0.25, score="gradient", revive_every=1, seed=0, assign="per-client", prior="federation")
    per.active_for(1, 7), per.active_for(1, 8)
    per.observe_clients(arrays(), {7: {}, 8: {}}, {7: [float(i) for i in range(8)]})  # 8 sent none: it keeps no score
    assert set(per.client_scores) == {7} and sum(per.client_scores[7].values()) == pytest.approx(1.0)
    assert per.active_for(2, 9) == [m for m in MODULES if m in ranked[-2:]]  # a new client starts from the federation's top two
    with pytest.raises(ConfigError, match="not gradient with DP or secure"):
        FedsiteConfig(module_selection="kill-revive", kr_score="gradient", dp="local").validate()
    with pytest.raises(ConfigError, match="not gradient with DP or secure"):
        FedsiteConfig(module_selection="kill-revive", kr_score="gradient", secure=True, clients=4).validate()


def test_a_gradient_round_reads_each_clients_norms_and_rejects_a_malformed_vector(tmp_path):
    config = FedsiteConfig(module_selection="kill-revive", kr_active_share=0.25, kr_assign="per-client", kr_score="gradient")
    strategy = FedsiteStrategy(RunRecorder(tmp_path, config), Aggregator("fedavg"), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=2, max_update_norm=0)
    strategy.module_selection = selection_for(config, arrays())
    strategy._global = arrays()
    keys = {node: keys_of(arrays(), strategy.module_selection.active_for(1, node)) for node in (2, 3, 4)}
    trained = {node: {k: arrays()[k] + 1 for k in ks} for node, ks in keys.items()}
    good = [float(i + 1) for i in range(8)]
    replies = [reply(2, trained[2], 10, **{GRAD_NORMS_KEY: good}), reply(3, trained[3], 10, **{GRAD_NORMS_KEY: good[:7]}),
               reply(4, trained[4], 10, **{GRAD_NORMS_KEY: [1.0] * 7 + [float("nan")]})]
    strategy.aggregate_train(1, replies)
    assert set(strategy.module_selection.client_scores) == {2}  # 3 and 4 were rejected, 2 scored every module
    assert strategy.module_selection.client_scores[2][sorted(MODULES)[7]] == pytest.approx(8 / 36)
    rows = [json.loads(line) for line in (tmp_path / "clients.jsonl").read_text().splitlines()]
    reasons = {row["node_id"]: row.get("reason", "") for row in rows}
    assert "7 values, expected 8" in reasons[3] and "NaN" in reasons[4] and not reasons[2]
