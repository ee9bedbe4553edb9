"""Which runs the dashboard shows, and the files of each.

The user names folders (roots). A root that holds a run's files is one run; otherwise its
subfolders that do are runs (a sweep folder, `simulations/sweep.py`), and one level further
(a folder of sweeps). A subfolder that is a symbolic link counts only if it resolves inside its
root; any other link is skipped. Each run gets an opaque id (a hash of its root and its place
below it); requests name runs by id only and the id is looked up here, never joined into a path.
Roots are rescanned at most once a second, so runs of a sweep appear as they start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dashboard.files import JsonlFile, SmallFile, open_below, safe_name, stat_below

log = logging.getLogger("fedsite.dashboard")

RUN_FILES = ("metrics.jsonl", "clients.jsonl", "privacy.jsonl", "summary.json", "config.toml")
RUN_MARKERS = ("metrics.jsonl", "config.toml", "summary.json")  # a folder with one of these is a run
RESCAN_SECONDS = 1.0
MAX_DEPTH = 2  # root/sweep/run
MAX_RUNS = 2000


class DashboardError(ValueError):
    """A folder given on the command line that cannot be served; one line."""


@dataclass
class Root:
    path: Path  # resolved
    fd: int
    live: bool = False  # the folder of a run in progress in this process: a run even before its first file


@dataclass
class Run:
    id: str
    name: str
    root: Root
    parts: tuple[str, ...]
    metrics_file: JsonlFile = field(init=False)
    clients_file: JsonlFile = field(init=False)
    privacy_file: JsonlFile = field(init=False)
    summary_file: SmallFile = field(init=False)
    config_file: SmallFile = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.metrics_file = JsonlFile(self.parts, "metrics.jsonl")
        self.clients_file = JsonlFile(self.parts, "clients.jsonl")
        self.privacy_file = JsonlFile(self.parts, "privacy.jsonl")
        self.summary_file = SmallFile(self.parts, "summary.json")
        self.config_file = SmallFile(self.parts, "config.toml")

    def stamps(self) -> dict[str, tuple[int, int] | None]:
        """(size, mtime ns) of each results file, None when absent: what a poll compares."""
        out = {}
        for name in RUN_FILES:
            st = stat_below(self.root.fd, self.parts, name)
            out[name] = (st.st_size, st.st_mtime_ns) if st else None
        return out

    def version(self) -> str:
        return hashlib.sha256(repr(sorted(self.stamps().items())).encode()).hexdigest()[:16]

    def _by_round(self) -> dict[int, dict[str, Any]]:
        """metrics.jsonl's rows by round; a round recorded twice (a resumed run) keeps its last row."""
        with self._lock:
            rows = self.metrics_file.refresh(self.root.fd)
        return {row["round"]: row for row in rows if isinstance(row.get("round"), int) and not isinstance(row.get("round"), bool)}

    def rounds(self) -> list[dict[str, Any]]:
        """The training rounds (1, 2, ...) of metrics.jsonl, in order; the baseline is `baseline()`."""
        by_round = self._by_round()
        return [by_round[r] for r in sorted(by_round) if r > 0]

    def baseline(self) -> dict[str, Any] | None:
        """metrics.jsonl's round-0 row (the evaluation before training; no training keys), if written yet."""
        return self._by_round().get(0)

    def clients(self) -> list[dict[str, Any]]:
        with self._lock:
            return self.clients_file.refresh(self.root.fd)

    def client_table(self, convert: Callable[[dict[str, Any]], Any]) -> list[Any]:
        """clients.jsonl's rows through `convert`, converted once each (a poll converts only new rows)."""
        with self._lock:
            self.clients_file.refresh(self.root.fd)
            return list(self.clients_file.mapped(convert))

    def privacy(self) -> list[dict[str, Any]]:
        with self._lock:
            return self.privacy_file.refresh(self.root.fd)

    def config(self) -> dict[str, Any]:
        with self._lock:
            return self.config_file.refresh(self.root.fd) or {}

    def summary(self) -> dict[str, Any] | None:
        with self._lock:
            return self.summary_file.refresh(self.root.fd)

    def skipped_lines(self) -> dict[str, int]:
        return {f.name: f.skipped for f in (self.metrics_file, self.clients_file, self.privacy_file) if f.skipped}


def _run_id(root: Path, parts: Sequence[str]) -> str:
    return "r" + hashlib.sha256("\0".join([str(root), *parts]).encode()).hexdigest()[:12]


def _is_run(root_fd: int, parts: Sequence[str]) -> bool:
    return any(stat_below(root_fd, parts, name) is not None for name in RUN_MARKERS)


def _subfolders(root: Root, parts: tuple[str, ...]) -> Iterable[tuple[str, ...]]:
    """Subfolders of root/parts as parts below root: real folders, and links that resolve inside root."""
    fd = open_below(root.fd, parts)
    if fd is None:
        return []
    found = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if not safe_name(entry.name) or entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    found.append((*parts, entry.name))
                elif entry.is_symlink():
                    inside = _link_inside(root, parts, entry.name)
                    if inside is not None:
                        found.append(inside)
    except OSError:
        return []
    finally:
        os.close(fd)
    return sorted(found)


def _link_inside(root: Root, parts: tuple[str, ...], name: str) -> tuple[str, ...] | None:
    """The parts below root a linked folder resolves to, or None (logged) if it leads outside."""
    target = root.path.joinpath(*parts, name).resolve()
    try:
        relative = target.relative_to(root.path)
    except ValueError:
        log.warning("[fedsite] dashboard: skipped %s: a link to a folder outside %s", root.path.joinpath(*parts, name), root.path)
        return None
    return tuple(relative.parts) if relative.parts and target.is_dir() else None


class RunIndex:
    """The runs below the given folders, found again as they appear."""

    def __init__(self, folders: Sequence[str | Path], live: Sequence[str | Path] = ()) -> None:
        self.roots: list[Root] = []
        seen: set[Path] = set()
        for folder in [*folders, *live]:
            path = Path(folder).expanduser().resolve()
            if path in seen:
                continue
            seen.add(path)
            is_live = folder in live
            if is_live:
                path.mkdir(parents=True, exist_ok=True)
            if not path.is_dir():
                raise DashboardError(f"'{folder}' is not a folder (expected a results folder or a sweep folder)")
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
            except OSError as err:
                raise DashboardError(f"'{folder}' cannot be read: {err.strerror}") from None
            self.roots.append(Root(path, fd, is_live))
        self._runs: dict[str, Run] = {}
        self._order: list[str] = []
        self._scanned = 0.0
        self._lock = threading.Lock()
        self.rescan(force=True)

    def rescan(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._scanned < RESCAN_SECONDS:
                return
            self._scanned = now
            order = []
            for root in self.roots:
                for parts in self._find(root, (), 0):
                    run_id = _run_id(root.path, parts)
                    if run_id not in self._runs:
                        name = "/".join([root.path.name or str(root.path), *parts])
                        self._runs[run_id] = Run(run_id, name, root, parts)
                    order.append(run_id)
                    if len(order) >= MAX_RUNS:
                        break
            self._order = list(dict.fromkeys(order))

    def _find(self, root: Root, parts: tuple[str, ...], depth: int) -> list[tuple[str, ...]]:
        if _is_run(root.fd, parts) or (root.live and not parts):
            return [parts]
        if depth >= MAX_DEPTH:
            return []
        found = []
        for sub in _subfolders(root, parts):
            found += self._find(root, sub, depth + 1)
        return found

    def runs(self) -> list[Run]:
        self.rescan()
        return [self._runs[i] for i in self._order]

    def get(self, run_id: str) -> Run | None:
        """The run with this id, or None; the id is a dictionary key, never a path."""
        self.rescan()
        return self._runs.get(run_id) if run_id in self._order else None

    def close(self) -> None:
        for root in self.roots:
            try:
                os.close(root.fd)
            except OSError:
                pass
