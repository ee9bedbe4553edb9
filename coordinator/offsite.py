"""The offsite track of a run: emulator package, its adapter's global state, the plug-in.

A run can mix two kinds of clients. LoRA clients hold the backbone and train LoRA on it;
offsite clients get a signed emulator package and train its adapter blocks. Each kind is
aggregated with its own kind only. Both tracks travel in the one ArrayRecord Flower keeps
between rounds: LoRA arrays under their PEFT names, offsite arrays under `offsite/`, so
checkpointing and the round loop need not know there are two.

With `emulator-align-steps` > 0 the coordinator aligns the emulator toward the backbone before
every round, the round's adapter plugged into both (FedBiOT), and sends the change to offsite
clients as a signed low-rank refresh of the frozen middle (emulator/refresh.py) under
`refresh/` in their arrays, with its signature and round in their config.

A checkpoint keeps the track's state beyond its adapter (`track_state`, `restore_track`): the
latest refresh, so a resumed run sends it again and warm-starts the next alignment from it, and
the offsite aggregator's server-optimizer moments.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from safetensors.numpy import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emulator.cli import build_package
from emulator.distill import HeldScores, split_held
from emulator.keys import load_public_key, load_signing_key, public_key_pem
from emulator.layers import LayerMap
from emulator.offsite import LORA_MODES, base_model, get_offsite_arrays, set_offsite_arrays, trainable_model
from emulator.package import MANIFEST, load_package, manifest_layer_map, verify_package
from aggregation import server_opt
from aggregation.partial import under
from coordinator.aggregate import Aggregator
from emulator.refresh import align_refresh, apply_refresh, manifest_digest, refresh_arrays, refresh_bytes, sign_refresh
from finetune.backbone import load_backbone
from finetune.config import FedsiteConfig
from finetune.device import model_device, resolve_device
from finetune.lora import export_adapter
from protos.tensors import from_array_record, to_array_record

PREFIX = "offsite/"
REFRESH_PREFIX = "refresh/"
REFRESH_SIGNATURE_KEY, REFRESH_ROUND_KEY = "emulator-refresh-signature", "emulator-refresh-round"
KIND_LORA, KIND_EMULATOR = "lora", "emulator"

log = logging.getLogger("fedsite.coordinator")


def split_tracks(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(LoRA-track arrays, offsite-track arrays without the prefix) of a joint record."""
    lora = {k: v for k, v in arrays.items() if not k.startswith(PREFIX)}
    offsite = under(arrays, PREFIX)
    return lora, offsite


def join_tracks(lora: Mapping[str, np.ndarray], offsite: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**lora, **{PREFIX + k: v for k, v in offsite.items()}}


@dataclass
class OffsiteTrack:
    """The coordinator's side of offsite tuning: what clients get, and the full model it feeds."""

    package: Path
    public_key_pem: str
    layer_map: LayerMap
    mode: str
    plug_in: PreTrainedModel  # the full backbone made trainable like the emulator (adapter blocks)
    tokenizer: PreTrainedTokenizerBase
    initial: dict[str, np.ndarray]
    summary: dict
    public_key: object = None
    reference: str = ""  # what clients are told to load: the folder, or a fedsite-artifact:// reference
    signing_key: object = None  # signs per-round refreshes (emulator-align-steps > 0)
    _emulator: PreTrainedModel | None = None
    _refresh: tuple[int, dict, str] | None = None  # (round, factors, signature hex) of the latest refresh

    def client_config(self) -> dict[str, str]:
        """What an offsite client's round config adds: package reference, signer key, train mode (and the refresh's signature)."""
        values = {"package-kind": KIND_EMULATOR, "emulator-package": self.reference or str(self.package), "emulator-public-key": self.public_key_pem, "offsite-train": self.mode}
        if self._refresh is not None:
            values.update({REFRESH_SIGNATURE_KEY: self._refresh[2], REFRESH_ROUND_KEY: str(self._refresh[0])})
        return values

    def align(self, server_round: int, arrays: Mapping[str, np.ndarray], config: FedsiteConfig, batches: list) -> dict[str, Any]:
        """Warm-started alignment of the emulator toward the backbone, `arrays` plugged into both;
        signs the resulting refresh for this round's offsite clients. Returns its bytes and, when
        batches were held out, their loss before and at the kept step."""
        emulator = self.emulator(arrays, config.offsite_lora_settings(), config.seed)
        full = self.load(arrays)
        base = base_model(emulator)
        train, held = split_held(batches)
        scores = HeldScores()
        align_refresh(
            base, base_model(full), self.layer_map, train, rank=config.emulator_align_rank, steps=config.emulator_align_steps, lr=config.emulator_align_lr,
            objective=config.emulator_distill_objective, held=held, on_held=scores,
        )
        self._set_refresh(server_round, refresh_arrays(base))
        outcome: dict[str, Any] = {"refresh_bytes": refresh_bytes(self._refresh[1])}
        if (chosen := scores.summary()) is not None:
            outcome["held"] = chosen
            log.info(
                "round %d: alignment held-out loss %.4g before, %.4g at step %d of %d, the factors kept",
                server_round, chosen["before"], chosen["kept"], chosen["kept_step"], config.emulator_align_steps,
            )
        return outcome

    def _set_refresh(self, server_round: int, factors: dict[str, np.ndarray]) -> None:
        digest = manifest_digest((self.package / MANIFEST).read_bytes())
        self._refresh = (server_round, factors, sign_refresh(factors, server_round, digest, self.signing_key).hex())

    def route(self, messages: list[Message], record_for: Callable[[int], ArrayRecord]) -> list[Message]:
        """Emulator clients' messages carry the offsite arrays (`record_for(node)`, e.g. cut to the
        client's LoRA rank) and the package reference instead of LoRA arrays: nothing of the
        backbone beyond what the package holds reaches them."""
        out = []
        for msg in messages:
            config = msg.content["config"]
            if config.get("package-kind") != KIND_EMULATOR:
                out.append(msg)
                continue
            record = record_for(msg.metadata.dst_node_id)
            if self._refresh is not None:  # the round's refresh travels with the adapter
                record = to_array_record({**from_array_record(record), **{REFRESH_PREFIX + k: v for k, v in self._refresh[1].items()}})
            content = RecordDict({"arrays": record, "config": ConfigRecord({**dict(config), **self.client_config()})})
            out.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=msg.metadata.dst_node_id))
        return out

    def emulator(self, arrays: Mapping[str, np.ndarray], settings, seed: int) -> PreTrainedModel:
        """The emulator itself with `arrays` in its adapter: what offsite clients see (loaded once)."""
        if self._emulator is None:
            model, _, _, _ = load_package(self.package, self.public_key)
            self._emulator = trainable_model(model, self.layer_map, self.mode, settings, seed).to(model_device(self.plug_in))
            if self._refresh is not None:  # resumed: the next alignment warm-starts from the checkpoint's refresh
                apply_refresh(base_model(self._emulator), self.layer_map, self._refresh[1])
        set_offsite_arrays(self._emulator, arrays, self.layer_map, self.mode)
        return self._emulator

    def load(self, arrays: Mapping[str, np.ndarray]) -> PreTrainedModel:
        """The plug-in: the full backbone with the aggregated adapter in its blocks."""
        set_offsite_arrays(self.plug_in, arrays, self.layer_map, self.mode)
        return self.plug_in

    def export(self, arrays: Mapping[str, np.ndarray], folder: Path, model_spec: str) -> Path:
        """LoRA mode: a PEFT adapter for the full backbone; blocks mode: the adapter blocks' weights."""
        model = self.load(arrays)
        if self.mode in LORA_MODES:
            return export_adapter(model, folder, model_spec)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(folder / "adapter_blocks.safetensors"), metadata={"layer_map": str(self.layer_map.to_dict())})
        return folder


def track_state(track: OffsiteTrack, aggregator: Aggregator) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What a checkpoint keeps of the offsite track: (JSON state, arrays), the latest refresh
    (`refresh/`, its round in the state) and the offsite aggregator's moments (`opt/`)."""
    state: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    if track._refresh is not None:
        state["refresh_round"] = track._refresh[0]
        arrays.update({REFRESH_PREFIX + k: v for k, v in track._refresh[1].items()})
    if aggregator.state is not None:
        arrays.update({f"opt/{k}": v for k, v in server_opt.state_to_arrays(aggregator.state).items()})
    return state, arrays


def restore_track(track: OffsiteTrack, aggregator: Aggregator, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray], config: FedsiteConfig) -> None:
    """Put `track_state`'s output back (a ValueError says what does not fit). The refresh is
    applied to the emulator, which checks it fits its middle, before it is signed again with the
    package's key (a resumed run may rebuild the package)."""
    factors = {k: np.asarray(v, np.float32) for k, v in under(arrays, REFRESH_PREFIX).items()}
    if factors:
        if track.signing_key is None:
            raise ValueError("it holds an emulator refresh but this run does not align the emulator")
        track._emulator, track._refresh = None, (int(state["refresh_round"]), factors, "")
        try:
            track.emulator(track.initial, config.offsite_lora_settings(), config.seed)  # applies (and checks) the refresh
        except ValueError:
            track._emulator, track._refresh = None, None
            raise
        track._set_refresh(int(state["refresh_round"]), factors)
    opt = under(arrays, "opt/")
    if opt:
        moments = server_opt.state_from_arrays(opt)
        shapes = {k: np.shape(v) for k, v in track.initial.items()}
        if any(shapes.get(k) != np.shape(v) for part in (moments.m, moments.v) for k, v in part.items()):
            raise ValueError("its offsite server-optimizer moments do not match the offsite adapter")
        aggregator.state = moments


BUILT = "emulator.json"  # beside the run's package: the settings it was built with, and its build summary


def build_settings(config: FedsiteConfig) -> dict[str, Any]:
    """What a run's emulator package depends on (not the device it was distilled on)."""
    return {
        "model": config.model, "adapter_layers": config.emulator_adapter_layers, "stride": config.emulator_stride, "keep": config.emulator_keep,
        "fill": config.emulator_fill, "select": config.emulator_select, "quantize": config.emulator_quantize, "distill_steps": config.emulator_distill_steps,
        "distill_data": config.emulator_distill_data, "distill_objective": config.emulator_distill_objective,
        **({"distill_rank": config.emulator_distill_rank} if config.emulator_distill_rank else {}),  # absent at 0: runs from before it still match
    }


def _built_before(out: Path, package: Path, settings: dict[str, Any]) -> tuple[dict[str, Any], Any, Any] | None:
    """(summary, public key, manifest) of the package a resumed run built before, if it was built
    with these settings and still verifies against the run's key; else None (it is rebuilt)."""
    try:
        record = json.loads((out / BUILT).read_text())
        if not isinstance(record, dict) or record.get("settings") != settings or not isinstance(record.get("summary"), dict):
            log.info("resumed: the emulator package was built with other settings; building it again")
            return None
        public_key = load_public_key(out / "keys" / "public_key.pem")
        manifest = verify_package(package, public_key)
    except (OSError, ValueError) as err:  # PackageError is a ValueError
        log.info("resumed: the emulator package built before is not reused (%s); building it again", str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    log.info("resumed: reusing the emulator package built before (%s), not distilling it again", package)
    return {**record["summary"], "reused": True}, public_key, manifest


def prepare_offsite(config: FedsiteConfig, resumed: bool = False) -> OffsiteTrack:
    """Build and sign the run's emulator package (or verify `emulator-package`), set up the plug-in.

    A `resumed` run reuses the package it built before (same settings, still verifying), so it
    does not distil the emulator again."""
    out = Path(config.out)
    settings, own = build_settings(config), (out / "emulator").resolve()
    reused = _built_before(out, own, settings) if resumed and not config.emulator_package else None
    if reused is not None:
        package = own
        summary, public_key, manifest = reused
    elif config.emulator_package:
        package = Path(config.emulator_package).expanduser().resolve()
        key_file = package.parent / "keys" / "public_key.pem"
        if not key_file.is_file():
            raise FileNotFoundError(f"emulator-package: no coordinator public key at {key_file} (build it with `fedsite emulator build`)")
        public_key = load_public_key(key_file)
        manifest = verify_package(package, public_key)
        summary = {"package": str(package), "emulator_bytes": manifest.emulator_bytes, "backbone_bytes": manifest.backbone_bytes}
    else:
        package = own
        summary = build_package(
            config.model,
            package,
            config.emulator_adapter_layers or None,
            config.emulator_stride,
            None if config.emulator_quantize == "none" else config.emulator_quantize,
            out / "keys" / "signing_key.pem",
            distill_steps=config.emulator_distill_steps,
            distill_data=config.emulator_distill_data,
            distill_objective=config.emulator_distill_objective,
            distill_rank=config.emulator_distill_rank,
            device=config.device,
            fill=config.emulator_fill,
            select=config.emulator_select,
            keep=config.emulator_keep,
        )
        public_key = load_public_key(out / "keys" / "public_key.pem")
        manifest = verify_package(package, public_key)
        (out / BUILT).write_text(json.dumps({"settings": settings, "summary": summary}, indent=2))
    layer_map = manifest_layer_map(manifest)
    reference = str(package)
    if config.artifact_url:  # deployed clients fetch it by content hash from the artifact service
        from coordinator.artifacts import ArtifactStore

        keys = package.parent / "keys" if config.emulator_package else out / "keys"
        store = ArtifactStore(out / "artifacts", load_signing_key(keys / "signing_key.pem"))
        reference = str(store.ref(store.add(package).sha256, config.artifact_url))
        summary["artifact"] = reference
    backbone, tokenizer = load_backbone(config.model)
    plug_in = trainable_model(backbone, layer_map, config.offsite_train, config.offsite_lora_settings(), config.seed)
    initial = get_offsite_arrays(plug_in, layer_map, config.offsite_train)
    plug_in.to(resolve_device(config.device))  # after the initial arrays: the same on every device; fp32 (dtype is the LoRA backbone's)
    summary.update(emulator_bytes=manifest.emulator_bytes, backbone_bytes=manifest.backbone_bytes, layer_map=layer_map.to_dict())
    signing_key = None
    if config.emulator_align_steps > 0:  # the refreshes are signed by the package's key
        keys = package.parent / "keys" if config.emulator_package else out / "keys"
        signing_key = load_signing_key(keys / "signing_key.pem")
    return OffsiteTrack(package, public_key_pem(public_key).decode(), layer_map, config.offsite_train, plug_in, tokenizer, initial, summary, public_key, reference, signing_key)


def offsite_wanted(config: FedsiteConfig, planner: object | None) -> bool:
    """Whether a run may send emulators: a share of offsite clients, or profiles that cannot hold
    the backbone (no backbone allowed, or a memory bound the planner may find too small)."""
    if config.emulator_share > 0:
        return True
    profiles = getattr(getattr(planner, "population", None), "profiles", ())
    return any(not p.holds_backbone or p.memory_gb or p.accelerator_memory_gb for p in profiles)


def offsite_evaluation(track: OffsiteTrack, arrays: Mapping[str, np.ndarray], eval_set: list, config: FedsiteConfig, with_emulator: bool) -> dict:
    """Plug-in scores (`offsite_eval_*`) and, if asked, the emulator's own (`emulator_eval_*`)."""
    from finetune.evaluate import evaluate

    def score(model: PreTrainedModel, prefix: str) -> dict:
        result = evaluate(model, track.tokenizer, eval_set, config.max_seq_len, config.max_new_tokens)
        return {f"{prefix}_loss": result.loss, f"{prefix}_accuracy": result.accuracy, f"{prefix}_per_task": result.per_task}

    fields = score(track.load(arrays), "offsite_eval")
    if with_emulator:
        fields.update(score(track.emulator(arrays, config.offsite_lora_settings(), config.seed), "emulator_eval"))
    return fields
