"""Client state on disk: per run and client, atomic, and what error feedback reads back."""

import numpy as np
from flwr.app import Context, RecordDict

from client.client_app import encode_upload
from client.state import load_state, save_state, state_path
from finetune.config import FedsiteConfig


def context(tmp_path, run_id: int = 7, partition: int = 3) -> Context:
    return Context(run_id=run_id, node_id=99, node_config={"partition-id": partition, "state-dir": str(tmp_path)}, state=RecordDict(), run_config={})


def test_state_is_kept_per_run_and_client(tmp_path):
    arrays = {"x": np.arange(4, dtype=np.float32)}
    save_state(context(tmp_path), "feedback", arrays)
    np.testing.assert_array_equal(load_state(context(tmp_path), "feedback")["x"], arrays["x"])
    assert load_state(context(tmp_path, run_id=8), "feedback") is None  # a new run starts clean
    assert load_state(context(tmp_path, partition=4), "feedback") is None  # another client's is not ours
    assert not list(state_path(context(tmp_path), "feedback").parent.glob("*.tmp"))


def test_error_feedback_residual_goes_to_disk_not_node_state(tmp_path):
    ctx = context(tmp_path)
    config = FedsiteConfig(upload_codec="int8", error_feedback=True)
    received = {"m.lora_B.weight": np.zeros((8, 4), np.float32)}
    trained = {"m.lora_B.weight": np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)}
    encode_upload(trained, received, config, ctx)
    residual = load_state(ctx, "error-feedback")
    assert residual is not None and np.abs(residual["m.lora_B.weight"]).max() > 0  # int8 left something out
    assert len(ctx.state) == 0  # nothing adapter-sized stays in Flower's in-memory node state
