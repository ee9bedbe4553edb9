"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright; no browser
download): a live `fedsite simulate --dashboard` shows round 2 without a reload, with the curve's
points and the client table matching the run's files; `fedsite dashboard` overlays two runs."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dashboard.helpers import make_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"]  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]
URL_LINE = re.compile(r"dashboard: (http://localhost:\d+/)")

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`, as .ci/run does)")


class Process:
    """A `python -m fedsite ...` subprocess whose output is read line by line in a thread."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "fedsite", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def url(self, timeout: float = 120.0) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError("no dashboard address printed:\n" + "".join(self.seen[-30:])) from None
            self.seen.append(line)
            if match := URL_LINE.search(line):
                return match.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def new_page(browser, errors: list[str]):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    context.route(re.compile(r"^(?!http://localhost:)"), lambda route: route.abort())  # nothing leaves the machine
    page = context.new_page()
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return page


def chart(page, node_id: str) -> list[dict]:
    """The traces plotly holds for a chart: what it draws, read from the page."""
    return page.evaluate(f"() => document.getElementById({json.dumps(node_id)}).data.map(t => ({{name: t.name, x: Array.from(t.x), y: Array.from(t.y), meta: t.meta}}))")


def test_live_simulation_then_two_finished_runs_overlaid(browser, tmp_path: Path) -> None:
    out = tmp_path / "sweep" / "live"
    sim = Process(["simulate", "--model", "tiny", "--clients", "3", "--rounds", "4", "--out", str(out), "--dashboard", "127.0.0.1:0"], tmp_path)
    errors: list[str] = []
    try:
        url = sim.url()
        page = new_page(browser, errors)
        page.goto(url)
        page.wait_for_selector("#progress-text", state="attached")
        page.evaluate("() => { window.__notReloaded = true; }")  # gone if the page reloads
        page.wait_for_function("() => /round [2-4] of 4/.test(document.getElementById('progress-text').textContent)", timeout=150_000)
        assert page.evaluate("() => window.__notReloaded") is True
        page.screenshot(path=str(tmp_path / "live-overview.png"), full_page=True)

        page.click("nav a[data-page=curves]")
        page.wait_for_function("() => (document.getElementById('chart-loss').data || []).some(t => t.x.length >= 3)")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[0]["round"] == 0  # the baseline row: shown as round 0 while the run is live
        (loss,) = [t for t in chart(page, "chart-loss") if t["meta"]["key"] == "eval_loss"]
        assert loss["x"][:3] == [0, 1, 2] and loss["y"][:3] == pytest.approx([r["eval_loss"] for r in rows[:3]])
        (upload,) = [t for t in chart(page, "chart-bytes") if t["meta"]["key"] == "upload_bytes"]
        assert upload["x"][0] == 1 and upload["y"][0] == pytest.approx(rows[1]["upload_bytes"] / 1e6)

        page.click("nav a[data-page=clients]")
        page.wait_for_selector("#clients-table tbody tr[data-round='2']")
        cells = page.eval_on_selector_all("#clients-table tbody tr[data-round='2']", "rows => rows.map(r => [r.dataset.client, r.querySelector('td[data-key=status]').textContent])")
        assert sorted(cells) == [["0", "accepted"], ["1", "accepted"], ["2", "accepted"]]
        page.click("#clients-table th[data-key=seconds]")  # sortable: ascending seconds
        page.wait_for_selector("#clients-table th.sorted-asc[data-key=seconds]")
        seconds = page.eval_on_selector_all("#clients-table tbody td[data-key=seconds]", "cells => cells.map(c => parseFloat(c.textContent))")
        assert seconds == sorted(seconds) and len(seconds) >= 6
        page.screenshot(path=str(tmp_path / "live-clients.png"), full_page=True)
        assert errors == []  # the page's console, while the run's dashboard was up
        page.context.close()
        assert sim.proc.wait(timeout=120) == 0
    finally:
        sim.stop()
    assert (tmp_path / "live-overview.png").stat().st_size > 10_000

    make_run(tmp_path / "sweep" / "other", rounds=4, loss0=5.0)  # a second finished run beside the live one
    board = Process(["dashboard", str(tmp_path / "sweep"), "--address", "127.0.0.1:0"], tmp_path)
    try:
        page = new_page(browser, errors)
        page.goto(board.url(timeout=60) + "#curves")
        page.wait_for_function("() => (document.getElementById('chart-loss').data || []).length >= 4")
        evals = [t for t in chart(page, "chart-loss") if t["meta"]["key"] == "eval_loss"]
        assert sorted(t["name"] for t in evals) == ["sweep/live eval", "sweep/other eval"]
        other = next(t for t in evals if t["name"] == "sweep/other eval")
        assert other["x"] == [0, 1, 2, 3, 4] and other["y"] == pytest.approx([5.0, 4.8, 4.6, 4.4, 4.2])
        assert len({t["meta"]["run"] for t in chart(page, "chart-accuracy")}) == 2
        page.screenshot(path=str(tmp_path / "overlay.png"), full_page=True)
    finally:
        board.stop()
    assert errors == []
    if os.environ.get("FEDSITE_KEEP_SCREENSHOTS"):
        for png in tmp_path.glob("*.png"):
            shutil.copy(png, os.environ["FEDSITE_KEEP_SCREENSHOTS"])
