"""The coordinator's offsite track: package built and signed, plug-in fed by client arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.offsite import OffsiteSpec, offsite_model
from coordinator.offsite import OffsiteTrack, join_tracks, prepare_offsite, split_tracks
from emulator.keys import PackageError
from emulator.offsite import get_offsite_arrays, set_offsite_arrays
from finetune.config import FedsiteConfig


@pytest.fixture(scope="module")
def track(tmp_path_factory) -> tuple[FedsiteConfig, OffsiteTrack]:
    config = FedsiteConfig(model="tiny", out=str(tmp_path_factory.mktemp("run")), emulator_share=0.5, lora_rank=4)
    return config, prepare_offsite(config)


def test_package_is_built_signed_and_smaller(track):
    config, t = track
    assert (t.package / "manifest.sig").is_file() and t.layer_map.dropped() == (2,)  # tiny: 4 blocks, k=1, stride 2
    assert t.summary["emulator_bytes"] < t.summary["backbone_bytes"]
    assert set(t.client_config()) == {"package-kind", "emulator-package", "emulator-public-key", "offsite-train"}
    blocks = {int(k.split(".layers.")[1].split(".")[0]) for k in t.initial}
    assert blocks == {0, 3}
    # offsite LoRA covers every linear of the adapter blocks (the run's LoRA track only q/v)
    modules = {k.split(".")[-3] for k in t.initial if ".lora_A." in k}
    assert modules == set(config.offsite_lora_targets.split(",")) and len(modules) == 7


def test_client_trains_what_the_plug_in_loads(track):
    config, t = track
    spec = OffsiteSpec.from_config(t.client_config())
    emulator, tokenizer, layer_map = offsite_model(spec, config.offsite_lora_settings(), config.seed)
    set_offsite_arrays(emulator, t.initial, layer_map, spec.mode)
    with torch.no_grad():  # stands in for local training: move every LoRA factor
        for name, p in emulator.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
    trained = get_offsite_arrays(emulator, layer_map, spec.mode)
    plug_in = t.load(trained)
    assert all(np.array_equal(get_offsite_arrays(plug_in, t.layer_map, t.mode)[k], v) for k, v in trained.items())
    assert not all(np.array_equal(trained[k], t.initial[k]) for k in trained)


def test_pinned_key_and_missing_fields_are_refused(track):
    _, t = track
    with pytest.raises(PackageError, match="pinned"):
        OffsiteSpec.from_config(t.client_config(), pinned_key_pem="-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----")
    values = t.client_config()
    del values["emulator-package"]
    with pytest.raises(PackageError, match="emulator-package"):
        OffsiteSpec.from_config(values)


def test_tracks_split_and_join_without_loss():
    lora = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 3), np.float32)}
    offsite = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 3), np.float32)}
    joint = join_tracks(lora, offsite)
    assert len(joint) == 2
    back_lora, back_offsite = split_tracks(joint)
    assert (back_lora[next(iter(lora))] == 1).all() and (back_offsite[next(iter(offsite))] == 0).all()


class FakeGrid:
    """Four simulated nodes that answer the planner's who-are-you query with their partition id."""

    def __init__(self) -> None:
        self.nodes = [11, 12, 13, 14]

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord, Message, RecordDict

        return [Message(RecordDict({"client": ConfigRecord({"partition-id": m.metadata.dst_node_id - 11, "profile": ""})}), reply_to=m) for m in messages]


def test_emulator_clients_receive_no_tensor_of_the_dropped_blocks(track, tmp_path):
    """Everything an emulator client gets (round message + the package it names) is free of the
    backbone's dropped middle block: no key names it, no tensor equals one of its weights."""
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.numpy import load_file

    from coordinator.aggregate import Aggregator
    from coordinator.planner import planner_for
    from coordinator.results import RunRecorder
    from coordinator.strategy import FedsiteStrategy
    from finetune.backbone import load_backbone
    from simulations.experiment import population_for
    from finetune.cache import initial_lora_arrays
    from protos.tensors import from_array_record, to_array_record

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    config, t = track
    config = config.replace(out=str(tmp_path), emulator_share=0.5)
    planner = planner_for(config, population_for(config))  # the population, as the simulation hands it over
    strategy = FedsiteStrategy(RunRecorder(tmp_path, config), Aggregator(), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=4, offsite=t, planner=planner)
    joint = {**initial_lora_arrays("tiny", config.lora_settings(), config.seed), **{"offsite/" + k: v for k, v in t.initial.items()}}
    messages = list(strategy.configure_train(1, to_array_record(joint), ConfigRecord(config.to_flat()), FakeGrid()))
    emulator_msgs = [m for m in messages if m.content["config"].get("package-kind") == "emulator"]
    assert len(emulator_msgs) == 2 and len(messages) == 4

    backbone, _ = load_backbone("tiny")
    dropped = {name: p.detach().numpy() for name, p in backbone.named_parameters() if any(f".layers.{i}." in name for i in t.layer_map.dropped())}
    # a freshly initialised norm is all ones in every block: it carries nothing of block 2
    dropped = {name: w for name, w in dropped.items() if w.std() > 0}
    assert len(dropped) >= 7  # q, k, v, o, gate, up, down
    for msg in emulator_msgs:
        received = dict(from_array_record(msg.content["arrays"]))  # keyed by original block index
        assert not [k for k in received if any(f".layers.{i}." in k for i in t.layer_map.dropped())]
        package = msg.content["config"]["emulator-package"]  # keyed by emulator position
        received.update({f"package:{k}": v for k, v in load_file(f"{package}/emulator.safetensors").items()})
        for name, weight in dropped.items():
            assert not any(v.shape == weight.shape and np.allclose(v, weight) for v in received.values()), name
    for msg in messages:
        if msg not in emulator_msgs:  # LoRA clients get the LoRA track only
            assert not any(k.startswith("offsite/") for k in from_array_record(msg.content["arrays"]))


def test_emulator_clients_of_a_smaller_rank_train_and_return_that_rank(track, tmp_path):
    """HetLoRA over the offsite track: a rank-2 emulator client is sent the first 2 rank
    directions of the rank-4 offsite global, and its rank-2 reply is padded back before aggregation."""
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from aggregation.hetero_rank import truncate_to_rank
    from coordinator.aggregate import Aggregator
    from coordinator.planner import DeviceProfile, Planner
    from coordinator.results import RunRecorder
    from coordinator.strategy import FedsiteStrategy
    from finetune.cache import initial_lora_arrays
    from protos.tensors import from_array_record, to_array_record
    from protos.updates import encode_update

    class Population:  # partitions 0, 1 hold the backbone; 2, 3 are rank-2 devices without it
        deadline, upload_seconds = 0.0, 1.0
        profiles = [DeviceProfile("big", 0.5), DeviceProfile("small", 0.5, holds_backbone=False, lora_rank=2)]

        def profile_of(self, pid):
            return self.profiles[pid // 2]

        def event(self, server_round, pid):
            return "train"

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    config, t = track
    config = config.replace(out=str(tmp_path), aggregation="hetlora")
    planner = Planner(Population(), config.to_flat(), "hetlora")
    strategy = FedsiteStrategy(RunRecorder(tmp_path, config), Aggregator("hetlora"), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=4, planner=planner, offsite=t)
    joint = {**initial_lora_arrays("tiny", config.lora_settings(), config.seed), **{"offsite/" + k: v for k, v in t.initial.items()}}
    messages = list(strategy.configure_train(1, to_array_record(joint), ConfigRecord(config.to_flat()), FakeGrid()))
    emulator_msgs = [m for m in messages if m.content["config"].get("package-kind") == "emulator"]
    assert sorted(m.metadata.dst_node_id for m in emulator_msgs) == [13, 14]
    expected = truncate_to_rank(t.initial, 2)
    for msg in emulator_msgs:
        assert msg.content["config"]["lora-rank"] == 2
        received = from_array_record(msg.content["arrays"])
        assert received.keys() == expected.keys()
        assert all(np.array_equal(received[k], expected[k]) for k in expected)

    trained = {k: v + 1.0 for k, v in expected.items()}
    metrics = MetricRecord({"num-examples": 10, "train-loss": 1.0, "train-seconds": 1.0, "upload-bytes": 100})
    replies = [Message(RecordDict({"arrays": to_array_record(encode_update(trained, expected)), "metrics": metrics}),
                       reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)) for node in (13, 14)]
    arrays, _ = strategy.aggregate_train(1, replies)
    offsite = split_tracks(from_array_record(arrays))[1]
    a_key = next(k for k in offsite if "lora_A" in k)
    assert offsite[a_key].shape == t.initial[a_key].shape  # back at the track's rank 4
    np.testing.assert_allclose(offsite[a_key][:2], t.initial[a_key][:2] + 1.0, rtol=1e-6)
    np.testing.assert_array_equal(offsite[a_key][2:], 0.0)  # only zero-padded directions came back


def test_share_fill_run_ships_a_full_depth_emulator_of_drop_bytes(tmp_path):
    from emulator.build import decoder_layers

    config = FedsiteConfig(model="tiny", out=str(tmp_path / "run"), emulator_share=0.5, lora_rank=4, emulator_fill="share").validate()
    t = prepare_offsite(config)
    assert t.layer_map.fill == "share" and t.layer_map.slots == (0, 1, 1, 3)
    drop = prepare_offsite(FedsiteConfig(model="tiny", out=str(tmp_path / "drop"), emulator_share=0.5, lora_rank=4))
    assert t.summary["emulator_bytes"] == drop.summary["emulator_bytes"]
    spec = OffsiteSpec.from_config(t.client_config())
    emulator, _, layer_map = offsite_model(spec, config.offsite_lora_settings(), config.seed)
    assert layer_map == t.layer_map and len(decoder_layers(emulator.get_base_model())) == 4
    set_offsite_arrays(emulator, t.initial, layer_map, spec.mode)
    with torch.no_grad():
        for p in emulator.parameters():
            if p.requires_grad:
                p.add_(0.1)
    trained = get_offsite_arrays(emulator, layer_map, spec.mode)
    assert set(trained) == set(t.initial)  # keyed by original blocks 0 and 3, as with drop
    assert all(np.array_equal(get_offsite_arrays(t.load(trained), t.layer_map, t.mode)[k], v) for k, v in trained.items())


def test_emulator_keep_overrides_the_stride(tmp_path):
    kept = prepare_offsite(FedsiteConfig(model="tiny", out=str(tmp_path / "run"), emulator_share=0.5, lora_rank=4, emulator_stride=1, emulator_keep=0.5).validate())
    assert kept.layer_map.middle_kept == (1,) and kept.summary["layer_map"]["middle_kept"] == [1]


def test_a_resumed_run_reuses_its_package_only_if_built_alike_and_verifying(tmp_path, monkeypatch):
    import json

    import coordinator.offsite as offsite

    config = FedsiteConfig(model="tiny", out=str(tmp_path / "run"), emulator_share=0.5, lora_rank=4, emulator_distill_steps=2).validate()
    first = prepare_offsite(config)
    builds = []
    real_build = offsite.build_package
    monkeypatch.setattr(offsite, "build_package", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    again = prepare_offsite(config, resumed=True)
    assert builds == [] and again.summary["reused"] and again.layer_map == first.layer_map
    assert again.summary["emulator_bytes"] == first.summary["emulator_bytes"]
    assert all(np.array_equal(again.initial[k], v) for k, v in first.initial.items())
    prepare_offsite(config)  # a fresh run always builds
    assert builds == [1]
    record = tmp_path / "run" / offsite.BUILT
    changed = json.loads(record.read_text())
    changed["settings"]["distill_steps"] = 3
    record.write_text(json.dumps(changed))
    prepare_offsite(config, resumed=True)  # built with other settings: rebuilt
    assert builds == [1, 1]
    assert "distill_rank" not in json.loads(record.read_text())["settings"]  # absent at 0: records from before it still match
    low_rank = FedsiteConfig(**{**config.__dict__, "emulator_distill_rank": 2}).validate()
    prepare_offsite(low_rank, resumed=True)  # another distillation: rebuilt
    assert builds == [1, 1, 1] and json.loads(record.read_text())["settings"]["distill_rank"] == 2
    prepare_offsite(config, resumed=True)  # and back: rebuilt again
    assert builds == [1] * 4
    tensors = tmp_path / "run" / "emulator" / "emulator.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)
    assert prepare_offsite(config, resumed=True).summary.get("reused") is None  # no longer verifies: rebuilt
    record.write_text("{not json")
    prepare_offsite(config, resumed=True)
    assert builds == [1] * 6


def test_per_round_alignment_ships_a_signed_refresh_that_clients_apply(tmp_path, monkeypatch):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)

    from client.offsite import apply_round_refresh, split_refresh
    from emulator.cli import distillation_batches
    from protos.tensors import from_array_record

    config = FedsiteConfig(model="tiny", out=str(tmp_path / "run"), emulator_share=1.0, lora_rank=4, emulator_fill="share",
                           emulator_quantize="int8", emulator_align_steps=3, emulator_align_rank=2).validate()
    t = prepare_offsite(config)
    assert "emulator-refresh-signature" not in t.client_config()  # nothing to refresh before the first alignment
    outcome = t.align(1, t.initial, config, distillation_batches(t.tokenizer)[:2])
    nbytes = outcome["refresh_bytes"]
    assert "held" not in outcome  # two batches: both train, none is held out
    values = t.client_config()
    assert values["emulator-refresh-round"] == "1" and len(bytes.fromhex(values["emulator-refresh-signature"])) == 64
    msg = Message(content=RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"package-kind": "emulator"})}), message_type=MessageType.TRAIN, dst_node_id=5)
    routed = t.route([msg], lambda node: ArrayRecord())[0]
    adapter, refresh = split_refresh(from_array_record(routed.content["arrays"]))
    assert adapter == {} and sum(v.nbytes for v in refresh.values()) == nbytes > 0
    spec = OffsiteSpec.from_config(dict(routed.content["config"]))
    emulator, _, layer_map = offsite_model(spec, config.offsite_lora_settings(), config.seed)
    set_offsite_arrays(emulator, t.initial, layer_map, spec.mode)
    apply_round_refresh(emulator, layer_map, spec, refresh)
    batch = dict(t.tokenizer(["a b c", "hello"], return_tensors="pt", padding=True))
    coordinator_side = t.emulator(t.initial, config.offsite_lora_settings(), config.seed)
    with torch.no_grad():
        assert torch.equal(emulator(**batch).logits, coordinator_side(**batch).logits)  # applied exactly
    name = next(iter(refresh))
    with pytest.raises(PackageError, match="bad signature"):
        apply_round_refresh(emulator, layer_map, spec, {**refresh, name: refresh[name] * 2})
    with pytest.raises(PackageError, match="without its signature"):
        apply_round_refresh(emulator, layer_map, OffsiteSpec(spec.package, spec.public_key_pem, spec.mode), refresh)
    with pytest.raises(PackageError, match="not hex"):
        apply_round_refresh(emulator, layer_map, OffsiteSpec(spec.package, spec.public_key_pem, spec.mode, "zz", 1), refresh)
    t.align(2, t.initial, config, distillation_batches(t.tokenizer)[:2])
    newer = OffsiteSpec.from_config(t.client_config())
    apply_round_refresh(emulator, layer_map, newer, split_refresh(from_array_record(t.route([msg], lambda node: ArrayRecord())[0].content["arrays"]))[1])
    with pytest.raises(PackageError, match="older than the one applied"):
        apply_round_refresh(emulator, layer_map, spec, refresh)  # a replay of round 1's


def test_the_alignment_learning_rate_reaches_the_refresh_factors(tmp_path, monkeypatch):
    from dataclasses import replace

    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from emulator.cli import distillation_batches

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)
    config = FedsiteConfig(model="tiny", out=str(tmp_path / "run"), emulator_share=1.0, lora_rank=4, emulator_quantize="int8",
                           emulator_distill_steps=0, emulator_align_steps=3, emulator_align_rank=2).validate()
    t = prepare_offsite(config)
    batches = distillation_batches(t.tokenizer)[:2]  # no held-out batches: the last step's factors are kept

    def largest_b(lr: float) -> float:  # B starts at 0; AdamW moves it by about lr a step (warm-started from the last call)
        t.align(1, t.initial, replace(config, emulator_align_lr=lr), batches)
        return max(float(np.abs(v).max()) for k, v in t._refresh[1].items() if k.endswith(".lora_B"))

    assert largest_b(1e-9) < 1e-7
    assert largest_b(1e-2) > 1e-3
    with pytest.raises(ValueError, match="emulator-align-lr"):
        FedsiteConfig(model="tiny", emulator_align_lr=0.0).validate()


def test_a_checkpoint_keeps_the_refresh_and_the_offsite_moments_so_a_resumed_run_goes_on_exactly(tmp_path, monkeypatch):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)

    from client.offsite import apply_round_refresh, split_refresh
    from coordinator.aggregate import Aggregator
    from coordinator.checkpoint import read_checkpoint, save_checkpoint
    from coordinator.offsite import restore_track, track_state
    from coordinator.results import RunRecorder
    from coordinator.strategy import FedsiteStrategy
    from emulator.cli import distillation_batches
    from protos.tensors import from_array_record

    config = FedsiteConfig(model="tiny", out=str(tmp_path / "run"), emulator_share=1.0, lora_rank=4, emulator_fill="share", aggregation="fedadam",
                           emulator_quantize="int8", emulator_align_steps=3, emulator_align_rank=2).validate()
    batches = distillation_batches(prepare_offsite(config).tokenizer)[:2]
    t, aggregator = prepare_offsite(config), Aggregator("fedadam", 0.01)
    update = {k: v + 0.01 for k, v in t.initial.items()}
    aggregator(t.initial, [update], [1.0], 1)
    t.align(1, t.initial, config, batches)
    state, arrays = track_state(t, aggregator)
    assert state == {"refresh_round": 1} and any(k.startswith("refresh/") for k in arrays) and any(k.startswith("opt/") for k in arrays)
    recorder = RunRecorder(config.out, config)
    strategy = FedsiteStrategy(recorder, Aggregator("fedadam", 0.01), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=1, offsite=t, offsite_aggregator=aggregator)
    save_checkpoint(recorder, 1, {"a": np.zeros(2, np.float32)}, strategy_state=strategy.state_dict(), state_arrays=strategy.state_arrays())
    checkpoint = read_checkpoint(config.out)
    saved = checkpoint.state_arrays
    assert set(saved) == {f"offsite/{k}" for k in arrays} and all(np.array_equal(saved[f"offsite/{k}"], v) for k, v in arrays.items())

    resumed, resumed_aggregator = prepare_offsite(config), Aggregator("fedadam", 0.01)  # a restarted coordinator
    restarted = FedsiteStrategy(recorder, Aggregator("fedadam", 0.01), fraction_train=1.0, fraction_evaluate=0.0, min_train_clients=1,
                                offsite=resumed, offsite_aggregator=resumed_aggregator)
    restarted.load_state_dict(checkpoint.meta["strategy"], saved)
    assert resumed.client_config()["emulator-refresh-round"] == "1"
    restored, original = resumed_aggregator.state, aggregator.state
    assert restored.step == original.step == 1 and set(restored.m) == set(original.m) == set(restored.v)
    assert all(np.array_equal(restored.m[k], original.m[k]) and np.array_equal(restored.v[k], original.v[k]) for k in original.m)
    msg = Message(content=RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"package-kind": "emulator"})}), message_type=MessageType.TRAIN, dst_node_id=5)
    routed = resumed.route([msg], lambda node: ArrayRecord())[0]
    spec = OffsiteSpec.from_config(dict(routed.content["config"]))
    emulator, _, layer_map = offsite_model(spec, config.offsite_lora_settings(), config.seed)
    apply_round_refresh(emulator, layer_map, spec, split_refresh(from_array_record(routed.content["arrays"]))[1])  # re-signed: a client accepts it
    batch = dict(t.tokenizer(["a b c", "hello"], return_tensors="pt", padding=True))
    with torch.no_grad():  # the coordinator's emulator resumes from the refresh, so round 2's alignment warm-starts as it would have
        assert torch.equal(resumed.emulator(t.initial, config.offsite_lora_settings(), config.seed)(**batch).logits,
                           t.emulator(t.initial, config.offsite_lora_settings(), config.seed)(**batch).logits)
    t.align(2, t.initial, config, batches)
    resumed.align(2, resumed.initial, config, batches)
    assert all(np.allclose(resumed._refresh[1][k], v, atol=1e-6) for k, v in t._refresh[1].items())
    plain = FedsiteConfig(model="tiny", out=str(tmp_path / "plain"), emulator_share=1.0, lora_rank=4).validate()
    with pytest.raises(ValueError, match="does not align the emulator"):
        restore_track(prepare_offsite(plain), Aggregator("fedavg"), state, arrays, plain)
    name = next(k for k in arrays if k.endswith(".lora_A"))
    for bad, problem in [({**arrays, name: arrays[name][:, :-1]}, "has shape"), ({k: v for k, v in arrays.items() if k != name}, "missing"),
                         ({**arrays, "opt/m/" + next(iter(t.initial)): np.zeros(3)}, "moments do not match")]:
        fresh = prepare_offsite(config)
        with pytest.raises(ValueError, match=problem):  # checked against the emulator's middle before it is signed or sent
            restore_track(fresh, Aggregator("fedadam", 0.01), state, bad, config)
        assert "emulator-refresh-signature" not in fresh.client_config() or problem == "moments do not match"
