"""Artifact service throughput on loopback, measured side by side in one run.

The coordinator's artifact server runs in a child process (as it would on a real coordinator,
and so client and server do not share one GIL); the client fetches into a fresh cache each time.

1. A random file (--size-mb): a bare TCP socket as the ceiling, cold fetch per chunk size, over TLS, cached fetch with and without
   re-hashing, and a fetch whose server is killed at half way and restarted (resume).
2. Model folders (--folders: tiny, smollm2 or a path): publish (deterministic tar + sha256),
   cold fetch (download, verify, unpack) and cached fetch (re-tar and re-hash).

    python benchmarks/artifacts.py                              # 200 MB file + tiny model folder
    python benchmarks/artifacts.py --folders tiny,smollm2       # also the 517 MB SmolLM2 folder
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from client.artifacts import FetchOptions, fetch_artifact
from coordinator.artifacts import DEFAULT_CHUNK, ArtifactStore, serve_artifacts
from coordinator.certs import write_certs
from emulator.keys import generate_signing_key

MB = 1e6
DEFAULT_KIB = f"{DEFAULT_CHUNK >> 10} KiB (default)"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=200, help="size of the random file artifact")
    p.add_argument("--chunk-kb", default="64,256,1024,4096", help="client-requested chunk sizes to compare")
    p.add_argument("--folders", default="tiny", help="comma-separated model folders: tiny, smollm2 or paths")
    p.add_argument("--repeats", type=int, default=2, help="best of N per row (the machine is shared)")
    return p.parse_args()


# ------------------------------------------------------------------ server in a child process


def _serve(root: str, key_path: str, address: str, tls: tuple[str, str] | None, conn) -> None:
    server = serve_artifacts(ArtifactStore(root, key_path), address, *(tls or (None, None)))
    conn.send(server.port)
    conn.recv()  # any message: stop
    conn.send(server.bytes_sent)
    server.stop()


@dataclass
class ChildServer:
    """The artifact service in its own process; `kill()` drops every connection at once."""

    process: mp.Process
    conn: object
    port: int

    @classmethod
    def start(cls, root: Path, key_path: Path, port: int = 0, tls: tuple[str, str] | None = None) -> ChildServer:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(str(root), str(key_path), f"127.0.0.1:{port}", tls, child), daemon=True)
        process.start()
        return cls(process, parent, parent.recv())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        """Stop it and return the bytes it streamed."""
        self.conn.send("stop")
        sent = self.conn.recv()
        self.process.join()
        return sent

    def kill(self) -> None:
        self.process.kill()
        self.process.join()


def _send_file(path: str, conn) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        conn.send(listener.getsockname()[1])
        peer, _ = listener.accept()
        with peer, open(path, "rb") as handle:
            peer.sendfile(handle)


def raw_socket_seconds(path: Path, out: Path) -> float:
    """The same bytes over a bare TCP socket into a file, hashed: the ceiling without gRPC."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_send_file, args=(str(path), child), daemon=True)
    process.start()
    port = parent.recv()
    start = time.perf_counter()
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as sock, open(out, "wb") as handle:
        while n := sock.recv_into(buffer):
            digest.update(buffer[:n])
            handle.write(buffer[:n])
    seconds = time.perf_counter() - start
    process.join()
    return seconds


# ------------------------------------------------------------------ measurements


def timed_fetch(address: str, sha256: str, cache: Path, public_key, repeats: int, fresh: bool = True, **kwargs) -> float:
    """Best wall time over `repeats` fetches (each into a fresh cache folder unless `fresh` is False)."""
    best = float("inf")
    for i in range(repeats):
        target = cache / f"run{i}" if fresh else cache
        start = time.perf_counter()
        fetch_artifact(address, sha256, target, public_key, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best


def resume_row(store_root: Path, key_path: Path, sha256: str, size: int, cache: Path, public_key) -> tuple[float, float, float]:
    """Kill the server process at half way, start a new one on the same port.

    Returns (fetch seconds without the server's restart, restart seconds, bytes received / size).
    """
    servers = [ChildServer.start(store_root, key_path)]
    received, restart = [], []

    def on_chunk(offset: int, length: int, total: int) -> None:
        received.append(length)
        if len(servers) == 1 and offset >= total // 2:
            began = time.perf_counter()
            servers[0].kill()
            servers.append(ChildServer.start(store_root, key_path, servers[0].port))
            restart.append(time.perf_counter() - began)

    start = time.perf_counter()
    fetch_artifact(servers[0].address, sha256, cache, public_key, options=FetchOptions(backoff_s=0.05), on_chunk=on_chunk)
    seconds = time.perf_counter() - start
    servers[-1].stop()
    return seconds - sum(restart), sum(restart), sum(received) / size


def main() -> None:
    args = parse()
    rows: list[tuple[str, str, float, float]] = []  # (case, chunk, MB, seconds)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as tmp_name:
        tmp = Path(tmp_name)
        key_path = tmp / "signing_key.pem"
        public_key = generate_signing_key(key_path).public_key()
        store = ArtifactStore(tmp / "store", key_path)
        blob = tmp / "random.bin"
        with open(blob, "wb") as out:
            for _ in range(args.size_mb):
                out.write(os.urandom(1_000_000))
        start = time.perf_counter()
        item = store.add(blob)
        size_mb = item.size / MB
        rows.append(("publish random file (copy + sha256)", "-", size_mb, time.perf_counter() - start))

        rows.append(("raw TCP socket + sha256 (no gRPC: the ceiling)", "-", size_mb, min(raw_socket_seconds(blob, tmp / "raw.bin") for _ in range(args.repeats))))
        server = ChildServer.start(store.root, key_path)
        chunks_kb = [int(c) for c in args.chunk_kb.split(",")]
        for chunk_kb in chunks_kb:
            options = FetchOptions(chunk_size=chunk_kb << 10)
            seconds = timed_fetch(server.address, item.sha256, tmp / f"cache-{chunk_kb}", public_key, args.repeats, options=options)
            rows.append(("cold fetch, plaintext", f"{chunk_kb} KiB", size_mb, seconds))
        warm = tmp / f"cache-{chunks_kb[0]}" / "run0"
        rows.append(("cached fetch, re-hash", "-", size_mb, timed_fetch(server.address, item.sha256, warm, public_key, args.repeats, fresh=False)))
        trust = FetchOptions(recheck_cache=False)
        rows.append(("cached fetch, no re-hash", "-", size_mb, timed_fetch(server.address, item.sha256, warm, public_key, args.repeats, fresh=False, options=trust)))
        served = server.stop()
        notes.append(f"bytes served by the plaintext server: {served / item.size:.2f} x size ({len(chunks_kb)} chunk sizes x {args.repeats} cold fetches)")

        certs = write_certs(tmp / "tls")
        tls_server = ChildServer.start(store.root, key_path, tls=(str(certs.server_cert), str(certs.server_key)))
        seconds = timed_fetch(tls_server.address, item.sha256, tmp / "cache-tls", public_key, args.repeats, root_cert=certs.ca_cert)
        rows.append(("cold fetch, TLS", DEFAULT_KIB, size_mb, seconds))
        tls_server.stop()

        seconds, restart, ratio = resume_row(store.root, key_path, item.sha256, item.size, tmp / "cache-resume", public_key)
        rows.append(("cold fetch, server killed at 50% + restarted", DEFAULT_KIB, size_mb, seconds))
        notes.append(f"resumed fetch: the client received {ratio:.3f} x size in total; the server's restart ({restart:.1f} s) is not counted")

        for spec in [s for s in args.folders.split(",") if s]:
            # imported here so the spawned server processes do not load torch and transformers
            from finetune.backbone import build_char_tokenizer, build_tiny_llama, resolve_model_path, save_plain_folder

            folder = tmp / "tiny-model" if spec == "tiny" else Path(resolve_model_path(spec))
            if spec == "tiny":
                save_plain_folder(build_tiny_llama(), build_char_tokenizer(), folder)
            start = time.perf_counter()
            packed = store.add(folder)
            mb = packed.size / MB
            rows.append((f"publish {spec} folder (tar + sha256)", "-", mb, time.perf_counter() - start))
            server = ChildServer.start(store.root, key_path)
            rows.append((f"cold fetch {spec} folder (+ unpack)", DEFAULT_KIB, mb, timed_fetch(server.address, packed.sha256, tmp / f"cache-{spec}", public_key, args.repeats)))
            warm = tmp / f"cache-{spec}" / "run0"
            rows.append((f"cached fetch {spec} folder, re-tar + re-hash", "-", mb, timed_fetch(server.address, packed.sha256, warm, public_key, args.repeats, fresh=False)))
            server.stop()

    load = os.getloadavg()[0]
    print(f"\nArtifact service on loopback ({os.cpu_count()} CPUs, load average {load:.1f}), best of {args.repeats}\n")
    print("| case | chunk | MB | seconds | MB/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for case, chunk, mb, seconds in rows:
        rate = f"{mb / seconds:.0f}" if seconds >= 0.001 else "-"  # a cache lookup without hashing moves no bytes
        print(f"| {case} | {chunk} | {mb:.1f} | {seconds:.3f} | {rate} |")
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
