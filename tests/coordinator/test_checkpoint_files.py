"""Checkpoint files fail safe: a damaged, foreign or newer file is a one-line error that changes
nothing in the results folder; nothing is unpickled; the file is owner-only from the start and
holds no state of the DP noise."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from coordinator import checkpoint as ckpt
from coordinator import files
from coordinator.aggregate import Aggregator
from coordinator.client_dp import ClientLevelDP
from coordinator.results import RunRecorder
from finetune.config import FedsiteConfig

GLOBAL = {"l.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "l.lora_B.weight": np.ones((3, 2), np.float32)}


def saved_run(tmp_path: Path) -> tuple[FedsiteConfig, Path]:
    """A results folder after round 2 of 4: JSONL files, a checkpoint, and round 3's lines past it."""
    config = FedsiteConfig(out=str(tmp_path), model="tiny", aggregation="fedadam", num_server_rounds=4)
    recorder = RunRecorder(tmp_path, config)
    recorder.finish_round(0, {"eval_accuracy": 0.0, "eval_loss": 3.0})
    aggregator, dp = Aggregator("fedadam"), ClientLevelDP(adaptive=True, count_stddev=1.0)
    current = GLOBAL
    for server_round in (1, 2, 3):
        updates = [{k: v + server_round for k, v in current.items()}, {k: v - 0.5 for k, v in current.items()}]
        current, entry = dp(aggregator(current, updates, [1.0, 3.0], server_round), updates, 1.0)
        recorder.record_client({"round": server_round, "node_id": 1, "status": "accepted"})
        recorder.record_privacy({"round": server_round, **entry})
        recorder.finish_round(server_round, {"eval_accuracy": 0.5, "eval_loss": 2.0})
        if server_round == 2:  # round 3's lines are past the checkpoint: a resume would cut them
            ckpt.save_checkpoint(recorder, 2, current, aggregator, dp)
    return config, ckpt.checkpoint_path(tmp_path)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def members(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:  # our own, trusted file
        return {k: data[k] for k in data.files}


def rewrite(path: Path, arrays: dict[str, np.ndarray], **meta_changes) -> None:
    meta = json.loads(bytes(arrays["meta"]).decode())
    for dotted, value in meta_changes.items():
        *parents, last = dotted.split("__")
        target = meta
        for name in parents:
            target = target[name]
        target[last] = value
    with path.open("wb") as f:
        np.savez(f, **{**arrays, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)})


def refused(config: FedsiteConfig, path: Path, expected: str) -> str:
    """load_checkpoint fails with one line naming the file and `expected`."""
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(config)
    message = str(err.value)
    assert "\n" not in message and f"checkpoint '{path}': " in message
    assert expected in message, message
    return message


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def data_offset(path: Path, member: str) -> int:
    """Where the bytes of `member` start inside the archive (savez stores members uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    header = path.read_bytes()[info.header_offset : info.header_offset + 30]
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len


def damage_data(path: Path) -> None:
    flip_byte(path, data_offset(path, "global/l.lora_A.weight.npy") + 140)


def damage_header(path: Path) -> None:
    flip_byte(path, data_offset(path, "meta.npy") + 20)  # inside the npy header dict


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def save(path: Path, arrays: dict[str, np.ndarray], compress: bool = False) -> None:
    with path.open("wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)


def other_npz(path: Path) -> None:
    save(path, {"weights": np.ones(3)})


def npy_file(path: Path) -> None:
    with path.open("wb") as f:
        np.save(f, np.ones(3))


def text_file(path: Path) -> None:
    path.write_text("round = 2\n")


def empty_file(path: Path) -> None:
    path.write_bytes(b"")


def compressed(path: Path) -> None:
    save(path, members(path), compress=True)


def meta_not_json(path: Path) -> None:
    save(path, {**members(path), "meta": np.frombuffer(b"{round: 2", np.uint8)})


def meta_floats(path: Path) -> None:
    save(path, {**members(path), "meta": np.ones(4)})


def header_claims_more(path: Path) -> None:
    """A valid zip whose .npy header claims 2^40 elements: refused before anything is allocated."""
    huge = io.BytesIO()
    np.lib.format.write_array_header_1_0(huge, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
    huge.write(np.zeros(4, np.float32).tobytes())
    arrays = members(path)
    with zipfile.ZipFile(path, "w") as archive:
        for name, value in arrays.items():
            stream = io.BytesIO()
            np.save(stream, value)
            archive.writestr(f"{name}.npy", stream.getvalue())
        archive.writestr("global/huge.npy", huge.getvalue())


DAMAGE = [
    (damage_data, "truncated or corrupted (BadZipFile: Bad CRC-32"),
    (damage_header, "truncated or corrupted (BadZipFile: Bad CRC-32"),
    (truncate, "truncated or corrupted (BadZipFile"),
    (other_npz, "not a Fedsite checkpoint (missing 'meta')"),
    (npy_file, "not a Fedsite checkpoint (not an .npz archive)"),
    (text_file, "not a Fedsite checkpoint (not an .npz archive)"),
    (empty_file, "not a Fedsite checkpoint (not an .npz archive)"),
    (compressed, "is compressed); move it away or use another --out to start afresh"),
    (meta_not_json, "not a Fedsite checkpoint ('meta' is not JSON"),
    (meta_floats, "not a Fedsite checkpoint ('meta' is float64 of shape (4,), not JSON bytes)"),
    (header_claims_more, "truncated or corrupted (member 'global/huge.npy' declares 4398046511104 bytes of data and holds 16)"),
]


@pytest.mark.parametrize(("damage", "expected"), DAMAGE, ids=[d.__name__ for d, _ in DAMAGE])
def test_a_damaged_or_foreign_file_is_one_line_and_nothing_else_changes(tmp_path, damage, expected):
    config, path = saved_run(tmp_path)
    damage(path)
    before = snapshot(tmp_path)
    refused(config, path, expected)
    assert snapshot(tmp_path) == before  # round 3's lines are still there: nothing was cut back


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"version": 3}, "written by checkpoint version 3, this Fedsite reads version 2; resume it with that newer Fedsite"),
        ({"version": "1"}, "not a Fedsite checkpoint (version '1')"),
        ({"version": True}, "not a Fedsite checkpoint (version True)"),
        ({"round": "two"}, "corrupted ('round' must be an integer >= 0, got 'two')"),
        ({"round": -1}, "corrupted ('round' must be an integer >= 0, got -1)"),
        ({"config": [1]}, "corrupted ('config' must be an object, got [1])"),
        ({"recorder": None}, "corrupted ('recorder' must be an object, got None)"),
        ({"recorder__rounds": {"1": {}}}, "corrupted ('recorder.rounds' must be a list of objects"),
        ({"recorder__initial": 3}, "corrupted ('recorder.initial' must be an object or null, got 3)"),
        ({"recorder__jsonl": {"metrics.jsonl": -5}}, "corrupted ('recorder.jsonl' must be an object of file sizes"),
        ({"recorder__jsonl": {"metrics.jsonl": 1.5}}, "corrupted ('recorder.jsonl' must be an object of file sizes"),
        ({"client_dp": {"clip_norm": "big", "rounds": 2}}, "corrupted ('client_dp.clip_norm' must be a number > 0, got 'big')"),
        ({"client_dp": {"clip_norm": 0.1, "rounds": 2.5}}, "corrupted ('client_dp.rounds' must be an integer >= 0, got 2.5)"),
        ({"rng": {"python": [3, [1, 2], None]}}, "corrupted ('rng' must be the states of Python's and NumPy's generators"),
        ({"rng__numpy": ["MT19937", [1, 2, 3], 0, 0, 0.0]}, "corrupted ('rng' must be the states"),
        ({"strategy": [1]}, "corrupted ('strategy' must be an object or null, got [1])"),
        ({"strategy": {"offsite": 5}}, "corrupted ('strategy.offsite' must be an object whose refresh_round is a round number, got 5)"),
        ({"strategy": {"offsite": {"refresh_round": "x"}}}, "corrupted ('strategy.offsite' must be an object whose refresh_round is a round number"),
    ],
    ids=lambda value: json.dumps(value)[:40] if isinstance(value, dict) else None,
)
def test_a_newer_version_or_a_wrong_type_inside_is_one_line_and_nothing_else_changes(tmp_path, change, expected):
    config, path = saved_run(tmp_path)
    rewrite(path, members(path), **change)
    before = snapshot(tmp_path)
    refused(config, path, expected)
    assert snapshot(tmp_path) == before


def test_a_version_1_checkpoint_still_resumes(tmp_path):
    config, path = saved_run(tmp_path)
    assert json.loads(bytes(members(path)["meta"]).decode())["version"] == ckpt.VERSION == 2
    rewrite(path, members(path), version=1)  # written before the strategy's arrays existed
    assert ckpt.load_checkpoint(config).round == 2


def test_wrong_arrays_inside_are_refused(tmp_path):
    config, path = saved_run(tmp_path)
    original = members(path)
    for arrays, expected in [
        ({k: v for k, v in original.items() if not k.startswith("global/")}, "corrupted (no global arrays)"),
        ({**original, "notes": np.ones(2)}, "not a Fedsite checkpoint (unexpected member 'notes')"),
        ({**original, "opt/bogus": np.ones(2)}, "corrupted (server optimizer state: unexpected key 'bogus'"),
        ({**original, "opt/step": np.ones(3)}, "corrupted ("),
        ({**original, "global/names": np.array(["a", "b"])}, "not a Fedsite checkpoint (member 'global/names.npy' holds <U1, not numbers)"),
        ({**original, "state/notes": np.ones(2)}, "not a Fedsite checkpoint (unexpected member 'state/notes')"),
        ({**original, "state/offsite/opt/bogus": np.ones(2)}, "corrupted (server optimizer state: unexpected key 'bogus'"),
        ({**original, "state/offsite/refresh/b.0.q.lora_A": np.full((2, 3), np.nan, np.float32)}, "emulator refresh member 'state/offsite/refresh/b.0.q.lora_A' is not a finite matrix"),
        ({**original, "state/offsite/refresh/b.0.q.lora_A": np.ones(3, np.float32)}, "is not a finite matrix of LoRA factors"),
        ({**original, "state/offsite/refresh/b.0.q.lora_A": np.ones((2, 3), np.float32)}, "corrupted (an emulator refresh without the round it was made for)"),
    ]:
        rewrite(path, arrays)
        before = snapshot(tmp_path)
        refused(config, path, expected)
        assert snapshot(tmp_path) == before


class Boom:
    """Unpickling this would call `os.system`: a reader that unpickles runs it."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_nothing_is_ever_unpickled(tmp_path, monkeypatch):
    config, path = saved_run(tmp_path)
    save(path, {**members(path), "global/evil": np.array([Boom()], dtype=object)})  # savez pickles object arrays
    monkeypatch.chdir(tmp_path)
    refused(config, path, "not a Fedsite checkpoint (member 'global/evil.npy' holds Python objects, which are never unpickled)")
    assert not (tmp_path / "pwned").exists()


def test_every_flipped_byte_or_cut_is_refused_or_reads_the_same(tmp_path):
    """Damage anywhere in the file: either a one-line CheckpointError or (a byte zip readers ignore,
    such as a timestamp) exactly the saved state, never another exception or other contents."""
    config, path = saved_run(tmp_path)
    good = path.read_bytes()
    saved = ckpt.read_checkpoint(tmp_path)
    offsets = sorted(set(np.linspace(0, len(good) - 1, 400).astype(int)))
    for offset in offsets:
        damaged = bytearray(good)
        damaged[offset] ^= 0x5A
        path.write_bytes(bytes(damaged))
        try:
            loaded = ckpt.read_checkpoint(tmp_path)
        except ckpt.CheckpointError as err:
            assert "\n" not in str(err)
            continue
        assert loaded.meta == saved.meta and loaded.round == saved.round, offset
        assert all(np.array_equal(loaded.arrays[k], saved.arrays[k]) for k in saved.arrays), offset
    for length in range(0, len(good), max(1, len(good) // 200)):
        path.write_bytes(good[:length])
        with pytest.raises(ckpt.CheckpointError):
            ckpt.read_checkpoint(tmp_path)


def test_a_folder_in_place_of_the_checkpoint_is_refused_not_ignored(tmp_path):
    config, path = saved_run(tmp_path)
    path.unlink()
    path.mkdir()
    refused(config, path, "not a Fedsite checkpoint (not a regular file)")


def test_resume_cuts_files_only_after_the_state_is_restored(tmp_path, monkeypatch):
    config, path = saved_run(tmp_path)
    before = snapshot(tmp_path)
    checkpoint = ckpt.load_checkpoint(config)

    def fails(state):
        raise RuntimeError("cannot restore")

    dp = ClientLevelDP()
    monkeypatch.setattr(dp, "load_state_dict", fails)
    with pytest.raises(RuntimeError):
        ckpt.restore(checkpoint, RunRecorder(tmp_path, config, fresh=False), Aggregator("fedadam"), dp)
    assert snapshot(tmp_path) == before


def test_the_run_and_the_cli_stop_before_touching_the_results_folder(tmp_path, capsys):
    from coordinator.server_app import run_federation
    from fedsite.cli import main

    config, path = saved_run(tmp_path)
    truncate(path)
    before = snapshot(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupted"):
        run_federation(None, config)  # fails before the grid, the recorder or the model are touched
    assert snapshot(tmp_path) == before

    assert main(["simulate", "--model", "tiny", "--aggregation", "fedadam", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fedsite: error: checkpoint '{path}': truncated or corrupted (BadZipFile") and "\n" not in err
    assert snapshot(tmp_path) == before


def test_a_strategy_state_that_does_not_load_stops_the_run_before_the_results_folder_changes(tmp_path):
    from coordinator.server_app import run_federation

    config, path = saved_run(tmp_path)
    rewrite(path, members(path), strategy={"ledger": 5})  # well-formed JSON, but not a ledger's state
    before = snapshot(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint '.*': corrupted strategy state \(") as err:
        run_federation(None, config)
    assert "\n" not in str(err.value) and snapshot(tmp_path) == before  # round 3's lines were not cut


def test_an_older_checkpoint_with_noise_rng_state_still_resumes_and_the_state_is_ignored(tmp_path):
    config, path = saved_run(tmp_path)
    pcg_state = np.random.default_rng(5).bit_generator.state
    rewrite(path, members(path), client_dp={"clip_norm": 0.25, "rounds": 2, "rng": pcg_state})
    dp = ClientLevelDP(adaptive=True, count_stddev=1.0)
    ckpt.restore(ckpt.load_checkpoint(config), RunRecorder(tmp_path, config, fresh=False), Aggregator("fedadam"), dp)
    assert (dp.clip_norm, dp.rounds) == (0.25, 2)
    replay = np.random.default_rng(5)
    replay.bit_generator.state = pcg_state
    assert not np.allclose(dp.rng.normal(0.0, 1.0, size=16), replay.normal(0.0, 1.0, size=16))


def test_the_checkpoint_holds_no_dp_noise_state_and_resumptions_draw_different_noise(tmp_path):
    config, path = saved_run(tmp_path)
    arrays = members(path)
    meta = json.loads(bytes(arrays["meta"]).decode())
    assert set(arrays) == {"meta", *(f"global/{k}" for k in GLOBAL), *(k for k in arrays if k.startswith("opt/"))}
    assert set(meta["client_dp"]) == {"clip_norm", "rounds"}  # no generator state
    assert set(meta["rng"]) == {"python", "numpy"}  # the sampling RNGs only, which DP noise never draws from
    draws = []
    for _ in range(2):
        dp = ClientLevelDP(noise_multiplier=1.0, clip_norm=1.0)
        ckpt.restore(ckpt.load_checkpoint(config), RunRecorder(tmp_path, config, fresh=False), Aggregator("fedadam"), dp)
        state = np.random.get_state()[1].copy()
        noised, _ = dp.release(GLOBAL, GLOBAL, num_clients=1, sample_rate=1.0)
        assert np.array_equal(np.random.get_state()[1], state)  # the checkpointed numpy RNG was not used for noise
        draws.append(np.concatenate([(noised[k] - GLOBAL[k]).ravel() for k in GLOBAL]))
    assert not np.allclose(draws[0], draws[1])


def test_the_checkpoint_is_owner_only_from_its_first_byte(tmp_path, monkeypatch):
    config, path = saved_run(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    recorder = RunRecorder(tmp_path, config, fresh=False)
    seen = []
    savez = np.savez

    def watching(file, **arrays):
        seen.append(stat.S_IMODE(os.fstat(file.fileno()).st_mode))
        savez(file, **arrays)

    monkeypatch.setattr(ckpt.np, "savez", watching)
    old_umask = os.umask(0)  # the mode must not rely on the umask
    try:
        path.chmod(0o644)  # an older checkpoint: the new one is still owner-only
        ckpt.save_checkpoint(recorder, 3, GLOBAL)
    finally:
        os.umask(old_umask)
    assert seen == [0o600] and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not files.temporary_path(path).exists()


def test_a_link_planted_at_the_temporary_name_is_not_followed(tmp_path):
    config, path = saved_run(tmp_path)
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_text("keep me")
    files.temporary_path(path).symlink_to(victim)
    ckpt.save_checkpoint(RunRecorder(tmp_path, config, fresh=False), 2, GLOBAL)
    assert victim.read_text() == "keep me" and not path.is_symlink() and ckpt.read_checkpoint(tmp_path).round == 2
