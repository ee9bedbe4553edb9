"""SecAgg+ at the coordinator: Flower's real workflow and mod, real keys and masks, no Ray.

A loopback grid hands each message to the node's ClientApp (Flower's `secaggplus_mod` around a
handler that returns a known update), so the unmasked mean can be compared with the plain one.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from client.secure import dropout_mod, secure_mods
from coordinator.client_dp import ClientLevelDP
from coordinator.results import RunRecorder
from coordinator.secure import check_sum, restore_frozen, run_secure, share_parameters
from finetune.config import FedsiteConfig
from tests.aggregation.helpers import a_key, b_key, lora_update

pytestmark = pytest.mark.usefixtures("serverapp_identity")

MAX_WEIGHT = 32.0
CLIP = 1.0
LEVELS = 2**22


class LoopbackGrid:
    """Delivers each message to its node's ClientApp in-process, as the SuperLink would (copied, not shared)."""

    def __init__(self, app: ClientApp, clients: int) -> None:
        self.app = app
        self.run = SimpleNamespace(run_id=7)
        self.contexts = {
            1000 + i: Context(run_id=7, node_id=1000 + i, node_config={"partition-id": i, "num-partitions": clients}, state=RecordDict(), run_config={})
            for i in range(clients)
        }
        self.sent: list[tuple[int, str, Message]] = []  # (node, stage, reply) for inspection

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            incoming = copy.deepcopy(msg)
            stage = incoming.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            try:
                reply = self.app(incoming, self.contexts[node])
            except Exception as err:  # a failing client answers with an error, as in deployment
                reply = Message(Error(code=0, reason=str(err)), reply_to=incoming)
            self.sent.append((node, stage, reply))
            replies.append(reply)
        return replies


def updates_for(clients: int) -> dict[int, dict[str, np.ndarray]]:
    return {i: {k: 0.05 * v for k, v in lora_update(np.random.default_rng(i), head=False).items()} for i in range(clients)}


LOCAL_DP = {"dp-noise-multiplier": 1.0, "dp-sample-rate": 0.1, "dp-steps": 2.0, "dp-total-steps": 2.0, "dp-delta": 1e-5, "dp-epsilon": 0.5}


def known_update_app(updates: dict[int, dict[str, np.ndarray]], *outer, metrics: dict | None = None) -> ClientApp:
    """Flower's SecAgg+ mod around a handler that returns this partition's known update."""
    app = ClientApp(mods=secure_mods(*outer))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        part = int(context.node_config["partition-id"])
        keys = json.loads(msg.content.config_records["fitins.config"]["array-keys"])
        arrays = [updates[part][k] for k in keys]
        fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), 10 + part, {"client-id": part, "num-examples": 10 + part, "train-loss": 1.0, **(metrics or {})})
        return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return app


def federate(tmp_path, clients: int, drop: set[int] = frozenset(), stage: str = Stage.COLLECT_MASKED_VECTORS, metrics: dict | None = None, **changes):
    """One secure round over `clients` known updates; (final arrays, metrics row, grid)."""
    updates = updates_for(clients)
    settings = dict(model="tiny", secure=True, clients=clients, min_train_clients=clients, num_server_rounds=1, secure_max_weight=MAX_WEIGHT,
                    secure_clip_range=CLIP, secure_threshold=0.5, out=str(tmp_path / "run"))
    config = FedsiteConfig(**{**settings, **changes}).validate()
    recorder = RunRecorder(config.out, config)
    initial = {k: np.zeros_like(v) for k, v in updates[0].items()}
    grid = LoopbackGrid(known_update_app(updates, dropout_mod(drop, stage), metrics=metrics), clients)

    def close_round(server_round: int, arrays: dict, seconds: float | None) -> dict:  # stands in for the central evaluation
        recorder.finish_round(server_round, {"eval_loss": 0.0})
        return {"eval-loss": 0.0}

    final = run_secure(grid, config, recorder, initial, close_round)
    return updates, final, recorder.rounds[-1], grid


def plain_mean(updates, survivors):
    weights = np.array([10 + i for i in survivors], dtype=np.float64)
    return {k: sum(w * updates[i][k].astype(np.float64) for w, i in zip(weights, survivors)) / weights.sum() for k in updates[survivors[0]]}


@pytest.mark.parametrize("dropped", [0.0, 0.1, 0.3])
def test_masked_mean_equals_plain_mean_with_dropouts(tmp_path, dropped):
    clients = 10
    drop = set(range(int(round(dropped * clients))))
    updates, final, row, _ = federate(tmp_path, clients, drop)
    survivors = [i for i in range(clients) if i not in drop]
    expected = plain_mean(updates, survivors)
    share = sum(10 + i for i in survivors) / MAX_WEIGHT  # the weights' share of the levels
    bound = len(survivors) * (2 * CLIP / LEVELS) / share  # stochastic rounding: < 1 level per client
    for key, value in expected.items():
        assert np.max(np.abs(final[key] - value)) <= bound, key
    assert row["contributors"] == survivors
    assert sorted(r["client"] for r in row["rejected"]) == sorted(drop) and all(r["stage"] == Stage.COLLECT_MASKED_VECTORS for r in row["rejected"])
    assert row["upload_bytes"] > row["secure_masked_bytes"] > 0 and set(row["secure_stage_seconds"]) == {"setup", "share_keys", "collect_masked_vectors", "unmask"}


def test_below_threshold_unmasking_is_refused_and_the_adapter_kept(tmp_path):
    # 6 clients, 4 shares needed: 3 dropouts leave 3
    updates, final, row, grid = federate(tmp_path, 6, {0, 1, 2}, secure_threshold=4.0, secure_num_shares=5.0)
    assert all(np.all(v == 0) for v in final.values())  # the initial (zero) adapter stays
    assert "halted" in row["secure_halted"] and "4 needed" in row["secure_halted"]
    assert row["contributors"] == [] and {r["client"] for r in row["rejected"]} >= {0, 1, 2}
    assert not any(stage == Stage.UNMASK for _, stage, _ in grid.sent)  # no share was ever requested


def test_a_masked_update_is_statistically_unrelated_to_the_plain_one(tmp_path):
    clients = 4
    updates, _, _, grid = federate(tmp_path, clients, secure_max_weight=16.0)
    node, _, reply = next((n, s, r) for n, s, r in grid.sent if s == Stage.COLLECT_MASKED_VECTORS)
    from flwr.common import bytes_to_ndarray

    def masked_of(r) -> np.ndarray:
        return np.concatenate([bytes_to_ndarray(b).ravel() for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]][1:])

    def plain_of(n: int) -> np.ndarray:
        return np.concatenate([v.ravel() for v in updates[n - 1000].values()])

    sent = [(n, r) for n, s, r in grid.sent if s == Stage.COLLECT_MASKED_VECTORS]
    masked = masked_of(reply)
    plain = plain_of(node)
    # key order on the wire is the initial dict's order, the same as updates'
    assert masked.shape == plain.shape
    uniform = masked.astype(np.float64) / 2**32
    # One client's vector has only 40 entries: its correlation has sd 0.16 and passed 0.4 in ~1% of
    # runs. Pooled over the round's 4 clients (160 pairs) the sd is 0.079, so 0.4 is 5 sigma.
    pooled = np.concatenate([masked_of(r) for _, r in sent]).astype(np.float64) / 2**32
    pooled_plain = np.concatenate([plain_of(n) for n, _ in sent])
    assert abs(np.corrcoef(pooled, pooled_plain)[0, 1]) < 0.4
    # Uniform on [0, 1): mean 0.5, std 0.289; the mean is checked over every client's masked vector.
    assert abs(pooled.mean() - 0.5) < 0.12 and 0.2 < uniform.std() < 0.38 and 0.24 < pooled.std() < 0.33
    assert len(reply.content.array_records) == 0 or all(len(r) == 0 for r in reply.content.array_records.values())  # plain arrays never leave


def test_ffa_lora_is_exact_under_masking(tmp_path):
    updates, final, _, _ = federate(tmp_path, 4, aggregation="ffa-lora")
    assert np.array_equal(final[a_key()], np.zeros_like(final[a_key()]))  # A frozen: global A restored exactly
    expected = plain_mean(updates, [0, 1, 2, 3])
    assert np.allclose(final[b_key()], expected[b_key()], atol=1e-4)


def test_client_dp_noises_the_unmasked_mean_and_writes_the_ledger(tmp_path):
    updates, final, row, _ = federate(tmp_path, 4, dp="client", noise_multiplier=0.5, dp_clip_norm=10.0)
    ledger = [json.loads(line) for line in (tmp_path / "run" / "privacy.jsonl").read_text().splitlines()]
    assert [e["client"] for e in ledger] == [0, 1, 2, 3] and all(e["mechanism"] == "client-dp" and e["secure"] and e["clipped"] is None for e in ledger)
    assert ledger[0]["epsilon"] == pytest.approx(ClientLevelDP(0.5, 10.0).release(final, final, 4, 1.0)[1]["epsilon"])
    # the noise has std z*C/m = 1.25, far above the updates
    assert max(float(np.max(np.abs(final[k] - plain_mean(updates, [0, 1, 2, 3])[k]))) for k in final) > 0.5
    assert row["privacy"]["noise_multiplier"] == 0.5


def test_local_dp_clients_get_the_same_ledger_lines_as_on_the_plain_path(tmp_path):
    from finetune.privacy import epsilon_for

    federate(tmp_path, 3, metrics=LOCAL_DP, dp="local")
    ledger = [json.loads(line) for line in (tmp_path / "run" / "privacy.jsonl").read_text().splitlines()]
    assert [(e["client"], e["mechanism"], e["client_epsilon"], e["steps"]) for e in ledger] == [(i, "local-dp-sgd", 0.5, 2) for i in range(3)]
    # the coordinator recomputes epsilon from (noise, sample rate, steps, delta): the reported 0.5 is not it
    recomputed = epsilon_for([(1.0, 0.1, 2)], 1e-5)
    assert all(e["epsilon"] == pytest.approx(recomputed) and e["epsilon_mismatch"] is True and e["secure"] for e in ledger)


def test_a_secure_round_counts_each_contributors_energy_as_the_plain_path_does(tmp_path):
    from protos.profile import DEFAULT_PROFILE

    updates, _, row, _ = federate(tmp_path, 4, drop={3}, metrics={"train-seconds": 2.0})
    entries = [json.loads(line) for line in (tmp_path / "run" / "clients.jsonl").read_text().splitlines() if '"accepted"' in line]
    download = sum(v.nbytes for v in updates[0].values()) / 1e6
    assert [e["client_id"] for e in entries] == [0, 1, 2]
    for e in entries:  # the default profile: 10 W x 2 s, 1 J per MB sent in all SecAgg+ stages, 0.5 J per MB received
        expected = DEFAULT_PROFILE.train_watts * 2.0 + DEFAULT_PROFILE.joules_per_mb_sent * e["upload_bytes"] / 1e6 + DEFAULT_PROFILE.joules_per_mb_received * download
        assert e["compute_joules"] == pytest.approx(20.0) and e["energy_joules"] == pytest.approx(expected)
    assert row["energy_joules"] == pytest.approx(sum(e["energy_joules"] for e in entries)) and row["gco2e"] > 0


def test_share_parameters_read_shares_and_counts():
    assert share_parameters(FedsiteConfig(secure=True, secure_num_shares=1.0, secure_threshold=0.6)) == (1.0, 0.6)
    assert share_parameters(FedsiteConfig(secure=True, secure_num_shares=5.0, secure_threshold=3.0)) == (5, 3)
    # an even neighbourhood would make Flower's clients fail in share_keys: rounded up to odd
    assert share_parameters(FedsiteConfig(secure=True, secure_num_shares=10.0, secure_threshold=6.0)) == (11, 6)


def test_the_unmasked_sum_is_checked_and_frozen_factors_restored():
    current = lora_update(np.random.default_rng(0), head=False)
    assert check_sum({k: v + 1 for k, v in current.items()}, current) is None
    assert "NaN" in check_sum({**current, a_key(): np.full_like(current[a_key()], np.nan)}, current)
    assert "shape" in check_sum({**current, a_key(): current[a_key()][:1]}, current)
    noisy = {k: (v + 1e-6).astype(np.float64) for k, v in current.items()}
    restored = restore_frozen(noisy, current, "B")
    assert np.array_equal(restored[a_key()], current[a_key()]) and restored[a_key()].dtype == current[a_key()].dtype
    assert not np.array_equal(restored[b_key()], current[b_key()])


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"aggregation": "median"}, "aggregation"),
        ({"aggregation": "hetlora"}, "aggregation"),
        ({"aggregation": "fedex-lora"}, "aggregation"),
        ({"upload_codec": "int8"}, "upload-codec"),
        ({"upload_topk": 0.1}, "upload-topk"),
        ({"dp": "client", "dp_adaptive_clip": True}, "dp-adaptive-clip"),
        ({"secure_num_shares": 4.0, "secure_threshold": 4.0}, "secure-threshold"),
        ({"clients": 1}, "clients"),
    ],
)
def test_secure_mode_refuses_what_needs_individual_updates(changes, field):
    from finetune.config import ConfigError

    with pytest.raises(ConfigError, match=f"'{field}'") as err:
        FedsiteConfig(secure=True, **changes).validate()
    assert "\n" not in str(err.value)


def test_secure_federation_through_flower_simulation_survives_a_dropout(tmp_path):
    from client.secure import secure_client_app
    from simulations.runner import simulate

    config = FedsiteConfig(model="tiny", secure=True, clients=5, num_server_rounds=2, local_steps=1, batch_size=2, train_per_task=4, test_per_task=1,
                           eval_examples=4, max_new_tokens=2, workers=1, secure_max_weight=16.0, out=str(tmp_path / "run"))
    out = simulate(config, client=secure_client_app(dropout_mod({1})))
    baseline, *rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert baseline["round"] == 0 and "contributors" not in baseline
    assert [r["contributors"] for r in rows] == [[0, 2, 3, 4]] * 2
    assert all(r["train_seconds"] > 0 and r["total_seconds"] >= r["train_seconds"] for r in rows)
    assert all([(x["client"], x["stage"]) for x in r["rejected"]] == [(1, Stage.COLLECT_MASKED_VECTORS)] for r in rows)
    assert all("simulated dropout" in r["rejected"][0]["reason"] for r in rows)
    assert rows[-1]["eval_loss"] < json.loads((out / "summary.json").read_text())["initial"]["eval_loss"]  # it learned
    clients = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    assert sum(c["status"] == "accepted" for c in clients) == 8 and all(c["upload_bytes"] > 0 for c in clients if c["status"] == "accepted")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def selecting_app(updates: dict[int, dict[str, np.ndarray]]) -> ClientApp:
    """Like `known_update_app`, but a client returns only the round's active modules (Kill-and-Revive)."""
    from protos.selection import decode_selection, keys_of, modules_of

    app = ClientApp(mods=secure_mods())

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        part = int(context.node_config["partition-id"])
        config = msg.content.config_records["fitins.config"]
        keys = json.loads(config["array-keys"])
        sent = keys_of(keys, decode_selection(config["active-modules"], modules_of(keys)))
        fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([updates[part][k] for k in sent]), 10 + part, {"client-id": part, "num-examples": 10 + part, "train-loss": 1.0})
        return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return app


def test_a_secure_round_with_a_module_selection_gives_the_plain_partial_mean(tmp_path):
    from aggregation.partial import partial_mean
    from protos.selection import keys_of

    clients = 4
    updates = updates_for(clients)
    config = FedsiteConfig(model="tiny", secure=True, clients=clients, min_train_clients=clients, num_server_rounds=1, secure_max_weight=MAX_WEIGHT,
                           secure_clip_range=CLIP, secure_threshold=0.5, module_selection="kill-revive", kr_active_share=0.5, out=str(tmp_path / "run")).validate()
    recorder = RunRecorder(config.out, config)
    initial = {k: np.zeros_like(v) for k, v in updates[0].items()}

    def close_round(server_round: int, arrays: dict, seconds: float | None) -> dict:
        recorder.finish_round(server_round, {"eval_loss": 0.0})
        return {"eval-loss": 0.0}

    final = run_secure(LoopbackGrid(selecting_app(updates), clients), config, recorder, initial, close_round)
    row = recorder.rounds[-1]
    selected = keys_of(initial, row["active_modules"])
    assert len(row["active_modules"]) == 1 and row["active_share"] == 0.5 and len(selected) == 2
    plain = partial_mean(initial, [{k: updates[i][k] for k in selected} for i in range(clients)], [10 + i for i in range(clients)])
    share = sum(10 + i for i in range(clients)) / MAX_WEIGHT
    bound = clients * (2 * CLIP / LEVELS) / share  # as in the full-vector test above
    for key in initial:
        if key in selected:
            assert np.max(np.abs(final[key] - plain[key])) <= bound, key
        else:
            assert np.array_equal(final[key], initial[key]), key  # killed: exactly as it was
    _, _, full_row, _ = federate(tmp_path / "full", clients)
    assert 0 < row["secure_masked_bytes"] < 0.75 * full_row["secure_masked_bytes"]  # half the arrays masked and sent
