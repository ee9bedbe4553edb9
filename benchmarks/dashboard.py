"""What a dashboard page load costs with many clients' rows, measured side by side in one run.

A synthetic results folder per size (N clients, all training every round, local DP on, so
clients.jsonl and privacy.jsonl each get N rows per round) is served by `fedsite dashboard` in a
child process (its own interpreter, as an operator runs it); the API calls a page load makes are
timed over loopback with gzip, as a browser asks for them:

    first visit   GET /, the front end and plotly.min.js (then cached by the browser)
    overview      /api/runs + /api/runs/ID
    clients       /api/runs + /api/runs/ID/clients (first 100 rows of all rounds, newest first)
    privacy       /api/runs + /api/runs/ID/privacy
    poll          /api/runs revalidated with its ETag while nothing changed (what the page does every 1.5 s)
    new round     the poll and the open clients page after N more client rows were appended

`cold` is the first request after start (every file parsed); `warm` the median of later ones
(files read incrementally: nothing new). With --browser, also the time headless Chromium takes
from navigation to a drawn clients table and privacy chart.

    python benchmarks/dashboard.py                    # 50 and 500 clients x 20 rounds
    python benchmarks/dashboard.py --clients 500,2000 --rounds 50 --browser
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import tomli_w

ROOT = Path(__file__).resolve().parents[1]
PAGES = {
    "overview": ["/api/runs", "/api/runs/{id}"],
    "clients": ["/api/runs", "/api/runs/{id}/clients?sort=round&order=desc&offset=0&limit=100"],
    "privacy": ["/api/runs", "/api/runs/{id}/privacy"],
}
STATIC = ["/", "/static/style.css", "/static/tables.js", "/static/charts.js", "/static/app.js", "/static/plotly.min.js"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="50,500", help="comma-separated numbers of clients")
    p.add_argument("--rounds", type=int, default=20, help="rounds in each synthetic run")
    p.add_argument("--repeats", type=int, default=7, help="warm requests per measurement (median)")
    p.add_argument("--browser", action="store_true", help="also time page loads in headless Chromium (/usr/bin/chromium)")
    return p.parse_args()


def client_row(r: int, c: int) -> dict:
    return {"round": r, "node_id": 10**19 + c, "num_examples": 300 + c % 50, "train_loss": 4.0 - 0.05 * r + (c % 7) * 0.01,
            "train_loss_final": 3.9, "steps": 10, "train_seconds": 0.4 + (c % 13) * 0.05, "upload_bytes": 28804, "client_id": c,
            "profile": ("phone", "laptop", "edge-box")[c % 3], "package_kind": "lora", "lora_rank": 8, "quantize": "none",
            "upload_codec": "fp32", "simulated_seconds": 3.0 + (c % 11), "dp_epsilon": 0.3 * r + (c % 5) * 0.01,
            "status": "accepted" if c % 50 else "rejected", **({} if c % 50 else {"reason": "update norm 3.2 > max-update-norm 1"})}  # fmt: skip


def privacy_row(r: int, c: int) -> dict:
    return {"round": r, "client": c, "mechanism": "local-dp-sgd", "accountant": "rdp", "noise_multiplier": 1.0, "sample_rate": 0.03,
            "steps": 10, "total_steps": 10 * r, "delta": 1e-5, "epsilon": 0.3 * r + (c % 5) * 0.01}  # fmt: skip


def metrics_row(r: int, n: int) -> dict:
    return {"round": r, "eval_loss": 4.5 - 0.05 * r, "eval_accuracy": min(1.0, 0.02 * r), "eval_seconds": 3.0, "round_seconds": 40.0,
            "sampled": n, "contributors": list(range(n - n // 50)), "rejected": [{"client": c, "reason": "update norm"} for c in range(0, n, 50)],
            "train_loss": 4.4 - 0.05 * r, "train_examples": 300 * n, "upload_bytes": 28804 * n, "aggregation": "fedavg"}  # fmt: skip


def append_round(folder: Path, r: int, n: int) -> None:
    with (folder / "clients.jsonl").open("a") as f:
        f.write("".join(json.dumps(client_row(r, c)) + "\n" for c in range(n)))
    with (folder / "privacy.jsonl").open("a") as f:
        f.write("".join(json.dumps(privacy_row(r, c)) + "\n" for c in range(n)))
    with (folder / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(metrics_row(r, n)) + "\n")


def make_run(folder: Path, n: int, rounds: int) -> None:
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(tomli_w.dumps({"model": "tiny", "clients": n, "num-server-rounds": rounds + 1, "dp": "local", "epsilon-budget": 8.0}))
    for name in ("clients.jsonl", "privacy.jsonl", "metrics.jsonl"):
        (folder / name).write_text("")
    for r in range(1, rounds + 1):
        append_round(folder, r, n)


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "fedsite", "dashboard", str(folder), "--address", "127.0.0.1:0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if match := re.search(r"dashboard: (http://\S+)", line):
            return proc, match.group(1).rstrip("/")
    raise RuntimeError("the dashboard did not start")


def fetch(http: httpx.Client, paths: list[str], run_id: str, etags: dict[str, str] | None = None) -> tuple[float, int]:
    """(seconds, bytes on the wire) of the requests one after the other, as the page makes them."""
    started, wire = time.perf_counter(), 0
    for path in paths:
        url = path.format(id=run_id)
        headers = {"If-None-Match": etags[url]} if etags and url in etags else {}
        with http.stream("GET", url, headers=headers) as response:
            wire += sum(len(chunk) for chunk in response.iter_raw())
        if etags is not None and "etag" in response.headers:
            etags[url] = response.headers["etag"]
    return time.perf_counter() - started, wire


def json_size(http: httpx.Client, path: str) -> int:
    """The decoded size of one answer (what the browser parses)."""
    return len(http.get(path).content)


def measure(n: int, rounds: int, repeats: int, browser: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedsite-dash-bench-") as tmp:
        folder = Path(tmp) / f"clients-{n}"
        make_run(folder, n, rounds)
        proc, url = serve(folder)
        try:
            with httpx.Client(base_url=url, headers={"Accept-Encoding": "gzip"}, timeout=60) as http:
                first = fetch(http, STATIC, "")
                run_id = http.get("/api/runs").json()["runs"][0]["id"]
                out: dict = {"n": n, "rows": n * rounds, "first visit": first}
                for page, paths in PAGES.items():
                    cold = fetch(http, paths, run_id)
                    warm = [fetch(http, paths, run_id) for _ in range(repeats)]
                    out[page] = (cold, statistics.median(w[0] for w in warm), warm[0][1])
                    out[f"{page} json"] = sum(json_size(http, p.format(id=run_id)) for p in paths)
                etags: dict[str, str] = {}
                fetch(http, ["/api/runs"], run_id, etags)
                out["poll"] = statistics.median(fetch(http, ["/api/runs"], run_id, etags)[0] for _ in range(repeats))
                append_round(folder, rounds + 1, n)
                out["new round"] = fetch(http, ["/api/runs", PAGES["clients"][1]], run_id, etags)[0]
                if browser:
                    out["browser"] = browser_times(url)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    return out


def browser_times(url: str) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
    times = {}
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=args)
        page = chromium.new_page()
        page.goto(url + "/")  # first visit: plotly.min.js and the front end into the cache
        page.wait_for_selector("#overview-facts div")
        for name, selector in (("clients", "#clients-table tbody tr[data-round]"), ("privacy", "#chart-privacy .main-svg")):
            started = time.perf_counter()
            page.goto(f"{url}/#{name}")
            page.reload()
            page.wait_for_selector(selector)
            times[name] = time.perf_counter() - started
        chromium.close()
    return times


def main() -> None:
    args = parse()
    results = [measure(int(n), args.rounds, args.repeats, args.browser) for n in args.clients.split(",")]
    ms = lambda s: f"{1000 * s:7.1f} ms"  # noqa: E731
    print(f"\n{args.rounds} rounds; client rows = clients x rounds (clients.jsonl and privacy.jsonl each)\n")
    print(f"{'clients':>8} {'rows':>7} | {'page':<9} {'cold':>10} {'warm':>10} {'gzip bytes':>11} {'JSON bytes':>11}")
    for r in results:
        first = r["first visit"]
        print(f"{r['n']:>8} {r['rows']:>7} | {'first':<9} {ms(first[0]):>10} {'':>10} {first[1]:>11}  (front end + plotly.min.js, once)")
        for page in PAGES:
            cold, warm, wire = r[page]
            print(f"{'':>8} {'':>7} | {page:<9} {ms(cold[0]):>10} {ms(warm):>10} {wire:>11} {r[page + ' json']:>11}")
        print(f"{'':>8} {'':>7} | {'poll':<9} {'':>10} {ms(r['poll']):>10}   (304 while nothing changed)")
        print(f"{'':>8} {'':>7} | {'new round':<9} {ms(r['new round']):>10} {'':>10}   (poll + clients page after {r['n']} more rows)")
        if "browser" in r:
            print(f"{'':>8} {'':>7} | chromium: clients table drawn in {ms(r['browser']['clients'])}, privacy chart in {ms(r['browser']['privacy'])}")
    if len(results) > 1:
        a, b = results[0], results[-1]
        for page in PAGES:
            print(f"warm {page} at {b['n']} vs {a['n']} clients: {b[page][1] / a[page][1]:.2f}x  (rows {b['rows'] / a['rows']:.0f}x)")


if __name__ == "__main__":
    main()
