"""What `fedsite emulator build|verify` run: argument parsing lives in `fedsite/`, logic here.

Keys: `build` signs with `key_path` (created there if it does not exist) or, without one,
with `<out's parent>/keys/signing_key.pem` (created once, reused by later builds), and writes
the public half beside it (`keys/public_key.pem`, or `<key>.pub.pem` for a named key). The
private key never goes inside the package. The package carries `public_key.pem` so that
`verify DIR` works out of the box, but that copy proves nothing on its own: real
deployments pin the coordinator's public key out of band and pass it as `--public-key`.
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Any

from emulator.build import build_emulator, quantize_middle, unique_parameters
from emulator.distill import HeldScores, distill_middle, example_batches, split_held
from emulator.keys import PackageError, generate_signing_key, key_id, load_signing_key, public_key_pem
from emulator.layers import make_layer_map
from emulator.package import PUBLIC_KEY, verify_package, write_package
from emulator.quantize import canonical
from finetune.backbone import SMOLLM2_ID, load_backbone
from finetune.config import DEFAULT_DISTILL_OBJECTIVE

MB = 1024 * 1024
DISTILL_SEED = 7919  # the built-in distillation corpus has its own seed, apart from any run's
SIMILARITY_BATCHES = 4  # batches of 8 distillation examples whose block outputs choose the kept blocks
log = logging.getLogger("fedsite.emulator")


def default_adapter_layers(num_layers: int) -> int:
    """Two adapter blocks per end as in the paper's small models; one for very shallow backbones."""
    return 2 if num_layers >= 8 else 1


def build_command(
    model_spec: str,
    out: str,
    adapter_layers: int | None = None,
    stride: int = 2,
    quantize: str | None = None,
    key_path: str | None = None,
    *,
    distill_steps: int = 0,
    distill_data: str = "",
    distill_objective: str = DEFAULT_DISTILL_OBJECTIVE,
    distill_rank: int = 0,
    device: str = "auto",
    fill: str = "drop",
    select: str = "stride",
    keep: float = 0.0,
) -> dict[str, Any]:
    """`fedsite emulator build`: `build_package`, then print the summary."""
    summary = build_package(
        model_spec, out, adapter_layers, stride, quantize, key_path,
        distill_steps=distill_steps, distill_data=distill_data, distill_objective=distill_objective, distill_rank=distill_rank, device=device, fill=fill, select=select, keep=keep,
    )
    print(_describe(summary))
    return summary


def build_package(
    model_spec: str,
    out: str | Path,
    adapter_layers: int | None = None,
    stride: int = 2,
    quantize: str | None = None,
    key_path: str | Path | None = None,
    *,
    distill_steps: int = 0,
    distill_data: str = "",
    distill_objective: str = DEFAULT_DISTILL_OBJECTIVE,
    distill_rank: int = 0,
    device: str = "auto",
    fill: str = "drop",
    select: str = "stride",
    keep: float = 0.0,
) -> dict[str, Any]:
    """Build, sign and write the emulator package `out` for backbone `model_spec`; return a summary.

    `distill_steps` > 0 first distils the kept middle toward the backbone on `distill_data`
    (a JSONL file or dataset folder the coordinator may use) or, without it, on examples of
    the built-in task families drawn from their own seed (never a client's data), on `device`
    (finetune/device.py); the package is written from the CPU, in fp32, whatever the device.
    `distill_rank` > 0 distils rank-r factors on the middle and folds them in (emulator/distill.py).
    `fill` "share" keeps the backbone's depth, dropped slots running their nearest kept block.
    `keep` > 0 keeps that share of the middle blocks, evenly spaced, instead of every `stride`-th.
    `select` "similarity" keeps as many middle blocks as the stride (or `keep`) would, chosen by the
    similarity of their outputs on the distillation set (emulator/similarity.py, CRaSh).
    """
    from finetune.device import resolve_device

    where = resolve_device(device)  # an unavailable device fails here, before anything is built
    out_dir = Path(out).expanduser().resolve()
    key_file = Path(key_path).expanduser().resolve() if key_path else out_dir.parent / "keys" / "signing_key.pem"
    if key_file == out_dir or out_dir in key_file.parents:
        raise PackageError(f"{key_file}: the signing key must not live inside the package folder {out_dir}")
    quantize = canonical(quantize)
    if select not in ("stride", "similarity"):
        raise ValueError(f"emulator: select must be 'stride' or 'similarity', got {select!r}")
    if keep > 0 and stride != 2:
        log.warning(f"emulator: stride {stride} is not used, keep {keep:g} chooses the kept middle blocks (keep 0 uses the stride)")
    model, tokenizer = load_backbone(model_spec)
    num_layers = model.config.num_hidden_layers
    layer_map = make_layer_map(num_layers, adapter_layers or default_adapter_layers(num_layers), stride, fill, keep)
    batches = distillation_batches(tokenizer, distill_data) if select == "similarity" or distill_steps > 0 else []
    if select == "similarity":
        from emulator.similarity import select_by_similarity

        layer_map, _ = select_by_similarity(model, batches[:SIMILARITY_BATCHES], layer_map)
        log.info(f"middle blocks kept by similarity: {list(layer_map.middle_kept)}")
    emulator = build_emulator(model, layer_map)
    if distill_steps > 0:
        progress = max(1, distill_steps // 10)

        def report(step: int, loss: float) -> None:
            if step % progress == 0 or step == distill_steps:
                log.info(f"distillation step {step}/{distill_steps}: {distill_objective} loss {loss:.4f}")

        model.to(where)
        emulator.to(where)
        held_scores = HeldScores()
        train, held = split_held(batches)
        losses = distill_middle(
            emulator, model, layer_map, train, steps=distill_steps, objective=distill_objective, rank=distill_rank, on_step=report,
            held=held, on_held=held_scores,
        )
        model.cpu()
        emulator.cpu()
        summary = f"distillation ({distill_objective}): {losses[0]:.4g} -> {losses[-1]:.4g} over {len(losses)} steps"
        if (chosen := held_scores.summary()) is not None:
            summary += f"; held-out loss {chosen['before']:.4g} before, {chosen['kept']:.4g} at step {chosen['kept_step']}, the weights kept"
        log.info(summary)
    if quantize:
        quantize_middle(emulator, layer_map, quantize)
    created = not key_file.exists()
    signing_key = generate_signing_key(key_file) if created else load_signing_key(key_file)
    public_file = key_file.with_name("public_key.pem") if key_file.name == "signing_key.pem" else key_file.with_suffix(".pub.pem")
    public_file.write_bytes(public_key_pem(signing_key.public_key()))  # the copy to pin on clients
    backbone_params, backbone_bytes = unique_parameters(model)
    manifest = write_package(
        emulator, tokenizer, layer_map, out_dir, signing_key, _backbone_id(model_spec, model), backbone_bytes,
        backbone_params=backbone_params,
    )
    package_bytes = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    summary = {
        "package": str(out_dir),
        "backbone_id": manifest.backbone_id,
        "layer_map": layer_map.to_dict(),
        "dropped": list(layer_map.dropped()),
        "fill": layer_map.fill,
        "select": select,
        "quantization": manifest.quantization or "none",
        "distilled": manifest.distilled,
        "emulator_bytes": manifest.emulator_bytes,
        "backbone_bytes": backbone_bytes,
        "package_bytes": package_bytes,
        "ratio": manifest.emulator_bytes / backbone_bytes,
        "emulator_params": manifest.emulator_params,
        "adapter_params": manifest.adapter_params,
        "backbone_params": backbone_params,
        "signing_key": str(key_file),
        "public_key": str(public_file),
        "signing_key_created": created,
        "key_id": key_id(signing_key.public_key()),
    }
    return summary


def verify_command(directory: str, public_key_path: str | None = None) -> int:
    """0 if the package verifies; else 1 with a one-line reason on stderr."""
    package = Path(directory).expanduser()
    key = Path(public_key_path).expanduser() if public_key_path else package / PUBLIC_KEY
    if public_key_path is None:
        print(f"note: verifying with the package's own {PUBLIC_KEY}; pin the coordinator's key with --public-key", file=sys.stderr)
    try:
        manifest = verify_package(package, key)
    except PackageError as err:
        reason = str(err) if str(package) in str(err) else f"{package}: {err}"
        print(f"error: {reason}", file=sys.stderr)
        return 1
    print(
        f"ok: {package} — {manifest.backbone_id}, blocks {len(manifest.bottom) + len(manifest.middle_kept) + len(manifest.top)}"
        f"/{manifest.num_layers}{', depth kept by sharing' if manifest.fill == 'share' else ''}, {len(manifest.files)} files, signer {manifest.signer_key_id[:16]}"
    )
    return 0


def _backbone_id(spec: str, model: Any) -> str:
    if spec == "smollm2":
        return SMOLLM2_ID
    if spec == "tiny":
        return "tiny"
    return str(getattr(model.config, "_name_or_path", "") or Path(spec).name)


def distillation_batches(tokenizer: Any, distill_data: str = "") -> list:
    """Chat-formatted batches for `distill_middle`: `distill_data` or the built-in families."""
    from finetune.tasks import generate_suite
    from finetune.userdata import load_examples

    examples = load_examples(distill_data) if distill_data else generate_suite(per_task=32, seed=DISTILL_SEED)
    if not examples:
        raise ValueError(f"emulator: no distillation examples in {distill_data!r}")
    random.Random(DISTILL_SEED).shuffle(examples)  # mixed families in every batch
    return example_batches(tokenizer, examples, batch_size=8, max_len=128)


def _describe(s: dict[str, Any]) -> str:
    lm = s["layer_map"]
    return "\n".join(
        [
            f"emulator package: {s['package']}",
            f"  backbone   {s['backbone_id']}: {lm['num_layers']} blocks, {s['backbone_bytes'] / MB:.2f} MB",
            f"  layer map  adapters {lm['bottom']} + {lm['top']}, middle kept {lm['middle_kept']}"
            + (" (by similarity)" if s.get("select") == "similarity" else "") + f", dropped {len(s['dropped'])}"
            + (f" (slots refilled by sharing: {lm['slots']})" if s["fill"] == "share" else ""),
            f"  emulator   {s['emulator_bytes'] / MB:.2f} MB ({s['ratio']:.1%} of the backbone), "
            f"quantization {s['quantization']}, distilled {s['distilled']}",
            f"  signed by  {s['signing_key']} (key id {s['key_id'][:16]}{', new' if s['signing_key_created'] else ''})",
        ]
    )
