"""The device's privacy policy: enforced on the device whatever the round message says, with an
accountant on the device's disk that survives restarts."""

import json
import os
import stat

import pytest
from flwr.app import Context, RecordDict

from client.client_app import train_handler
from client.privacy_policy import DevicePolicy, PolicyRefusal
from client.state import LedgerError, ledger_path, load_ledger
from finetune.config import FedsiteConfig
from finetune.privacy import epsilon_for
from tests.client.test_client_app import train_message

pytestmark = pytest.mark.usefixtures("serverapp_identity")

LOCAL = FedsiteConfig(model="tiny", clients=2, train_per_task=4, test_per_task=2, local_steps=2, batch_size=2, dp="local", noise_multiplier=1.0, num_server_rounds=2)


def device(tmp_path, **policy) -> Context:
    """A deployed device's context: its policy and ledger in its node config, as `fedsite client` writes them."""
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path), "privacy-ledger": str(tmp_path / "ledger.json")}
    node.update(DevicePolicy(**policy).node_config())
    return Context(run_id=1, node_id=5, node_config=node, state=RecordDict(), run_config={})


def reason(reply) -> str | None:
    declined = reply.content.config_records.get("declined")
    return None if declined is None else declined["reason"]


@pytest.mark.parametrize("changes, expected", [
    ({"dp": "none"}, "only with local DP"),
    ({"dp": "client"}, "DP added by the coordinator only"),
    ({"noise_multiplier": 0.5}, "noise multiplier 0.5 is below this device's minimum 1"),
    ({"noise_multiplier": 0.0}, "below this device's minimum"),
])
def test_a_round_asking_for_less_privacy_than_the_device_allows_is_declined(tmp_path, changes, expected):
    reply = train_handler(train_message(LOCAL.replace(**changes)), device(tmp_path, min_noise=1.0))
    assert expected in reason(reply)
    assert "arrays" not in reply.content.array_records
    assert not ledger_path(device(tmp_path)).exists()  # nothing trained, nothing spent


def test_a_round_asking_for_more_noise_trains_and_the_ledger_is_on_disk_owner_only(tmp_path):
    ctx = device(tmp_path, min_noise=1.0)
    reply = train_handler(train_message(LOCAL.replace(noise_multiplier=1.5)), ctx)
    assert reason(reply) is None and reply.content["metrics"]["dp-noise-multiplier"] == 1.5
    path = ledger_path(ctx)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text())["history"][0][0] == 1.5


def test_the_accountant_survives_a_client_restart_and_the_budget_holds(tmp_path):
    first = train_handler(train_message(LOCAL), device(tmp_path, epsilon_budget=1e6))
    spent = first.content["metrics"]["dp-epsilon"]
    # a restarted SuperNode: a fresh Context, empty in-memory state, the same disk
    second = train_handler(train_message(LOCAL), device(tmp_path, epsilon_budget=1e6))
    history = load_ledger(device(tmp_path))["history"]
    assert sum(steps for _, _, steps in history) == 4 and second.content["metrics"]["dp-total-steps"] == 4
    assert second.content["metrics"]["dp-epsilon"] == pytest.approx(epsilon_for(history, LOCAL.delta)) and second.content["metrics"]["dp-epsilon"] > spent
    # a budget between what is spent and what one more round costs: declined, nothing spent
    third = train_handler(train_message(LOCAL), device(tmp_path, epsilon_budget=second.content["metrics"]["dp-epsilon"] * 1.01))
    assert "past its budget" in reason(third)
    assert load_ledger(device(tmp_path))["history"] == history


def test_the_device_accounts_at_its_own_smaller_delta(tmp_path):
    reply = train_handler(train_message(LOCAL.replace(delta=1e-3)), device(tmp_path, delta=1e-7))
    assert reply.content["metrics"]["dp-delta"] == 1e-7


def test_an_unreadable_ledger_is_never_a_fresh_start(tmp_path):
    ctx = device(tmp_path, min_noise=1.0)
    ledger_path(ctx).write_text("{not json")
    reply = train_handler(train_message(LOCAL), ctx)
    assert "cannot be read" in reason(reply)
    with pytest.raises(LedgerError):
        load_ledger(ctx)


def test_a_device_without_a_policy_follows_the_round(tmp_path):
    reply = train_handler(train_message(LOCAL.replace(dp="none")), device(tmp_path))
    assert reason(reply) is None


@pytest.mark.parametrize("node, message", [({"dp-min-noise": -1.0}, "dp-min-noise"), ({"dp-epsilon-budget": "lots"}, "dp-epsilon-budget"), ({"dp-delta": 2.0}, "dp-delta")])
def test_a_malformed_policy_is_an_error(node, message):
    with pytest.raises(ValueError, match=message):
        DevicePolicy.from_node_config(node)


def test_policy_checks():
    policy = DevicePolicy(min_noise=1.0, epsilon_budget=2.0, delta=1e-6)
    policy.check(1.0, 2.0)
    with pytest.raises(PolicyRefusal):
        policy.check(0.99, 1.0)
    with pytest.raises(PolicyRefusal):
        policy.check(2.0, float("inf"))
    assert policy.delta_for(1e-5) == 1e-6 and DevicePolicy().delta_for(1e-5) == 1e-5
