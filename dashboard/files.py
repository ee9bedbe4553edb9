"""Reading a results folder safely while a run may still be writing it.

Every file is opened relative to the folder the user named (its descriptor is opened once, at
start), one path component at a time with `O_NOFOLLOW`: a symbolic link anywhere below that
folder is never followed, and no name is ever `..` or absolute, so nothing outside the given
folders can be read, whatever is planted inside them later. Only regular files are read, and
only up to a size cap.

The coordinator appends to its JSONL files (coordinator/results.py), so a reader can meet a last
line that is still being written: `JsonlFile` parses complete lines only (up to the last newline)
and remembers how far it got, so a poll reads only what was appended since. A malformed or
non-object line is skipped and counted, never fatal. A file that was truncated or replaced (a
fresh start of the same folder) is noticed and read again from the beginning.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
OPEN_FILE = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
MAX_JSONL_BYTES = 256 << 20  # more than 500 clients x 1000 rounds of clients.jsonl
MAX_SMALL_BYTES = 8 << 20  # config.toml, summary.json
FINGERPRINT_BYTES = 64  # the head of a file, to notice it was rewritten rather than appended to


def safe_name(name: str) -> bool:
    """A single path component: no separator, not '.', '..' or empty, no NUL."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def open_below(root_fd: int, parts: Sequence[str], name: str | None = None) -> int | None:
    """A descriptor for root/parts.../name (a folder when `name` is None), no link followed; None if
    it is absent, a link, not the expected kind, or unreadable."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            if not safe_name(part):
                return None
            child = os.open(part, OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
        if name is None:
            result, fd = fd, -1
            return result
        if not safe_name(name):
            return None
        handle = os.open(name, OPEN_FILE, dir_fd=fd)
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            os.close(handle)
            return None
        return handle
    except OSError:
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def stat_below(root_fd: int, parts: Sequence[str], name: str) -> os.stat_result | None:
    """The file's own status (a link is not followed and counts as absent)."""
    folder = open_below(root_fd, parts)
    if folder is None:
        return None
    try:
        st = os.stat(name, dir_fd=folder, follow_symlinks=False) if safe_name(name) else None
    except OSError:
        st = None
    finally:
        os.close(folder)
    return st if st is not None and stat.S_ISREG(st.st_mode) else None


def _read(fd: int, offset: int, length: int) -> bytes:
    chunks, got = [], 0
    while got < length:
        chunk = os.pread(fd, min(length - got, 1 << 20), offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def parse_line(line: bytes) -> dict[str, Any] | None:
    """One JSONL record, or None for a blank, malformed or non-object line."""
    try:
        row = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return row if isinstance(row, dict) else None


@dataclass
class JsonlFile:
    """The complete lines of one JSONL file so far, read incrementally."""

    parts: tuple[str, ...]
    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0  # malformed lines
    truncated: bool = False  # the file passed MAX_JSONL_BYTES: rows beyond it are not shown
    _identity: tuple[int, int] | None = None
    _offset: int = 0
    _head: bytes = b""
    _mapped: dict[Callable, tuple[list, list]] = field(default_factory=dict)

    def refresh(self, root_fd: int) -> list[dict[str, Any]]:
        fd = open_below(root_fd, self.parts, self.name)
        if fd is None:
            self._reset(None)
            return self.rows
        try:
            st = os.fstat(fd)
            identity = (st.st_dev, st.st_ino)
            head = _read(fd, 0, FINGERPRINT_BYTES) if self._head else b""
            if identity != self._identity or st.st_size < self._offset or head[: len(self._head)] != self._head:
                self._reset(identity)
            size = min(st.st_size, MAX_JSONL_BYTES)
            self.truncated = st.st_size > MAX_JSONL_BYTES
            if size > self._offset:
                self._consume(_read(fd, self._offset, size - self._offset))
                if not self._head:
                    self._head = _read(fd, 0, FINGERPRINT_BYTES)
        finally:
            os.close(fd)
        return self.rows

    def mapped(self, convert: Callable[[dict[str, Any]], Any]) -> list[Any]:
        """`convert` of every row, kept in step as rows are appended (call after `refresh`)."""
        cached = self._mapped.get(convert)
        if cached is None or cached[0] is not self.rows:
            cached = (self.rows, [])
            self._mapped[convert] = cached
        done = cached[1]
        done.extend(convert(row) for row in self.rows[len(done) :])
        return done

    def _reset(self, identity: tuple[int, int] | None) -> None:
        self.rows, self.skipped, self._identity, self._offset, self._head = [], 0, identity, 0, b""

    def _consume(self, data: bytes) -> None:
        end = data.rfind(b"\n")
        if end < 0:
            return  # only part of a line so far: wait for its newline
        for line in data[:end].split(b"\n"):
            if not line.strip():
                continue
            row = parse_line(line)
            if row is None:
                self.skipped += 1
            else:
                self.rows.append(row)
        self._offset += end + 1


@dataclass
class SmallFile:
    """A whole small file (TOML or JSON), parsed again only when it changed; None while unreadable."""

    parts: tuple[str, ...]
    name: str
    value: dict[str, Any] | None = None
    _stamp: tuple[int, int, int, int] | None = None

    def refresh(self, root_fd: int) -> dict[str, Any] | None:
        fd = open_below(root_fd, self.parts, self.name)
        if fd is None:
            self.value, self._stamp = None, None
            return None
        try:
            st = os.fstat(fd)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp == self._stamp:
                return self.value
            data = _read(fd, 0, MAX_SMALL_BYTES) if st.st_size <= MAX_SMALL_BYTES else b""
        finally:
            os.close(fd)
        self.value, self._stamp = self._parse(data), stamp
        return self.value

    def _parse(self, data: bytes) -> dict[str, Any] | None:
        try:
            text = data.decode()
            value = tomllib.loads(text) if self.name.endswith(".toml") else json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None  # half-written or foreign: shown as absent until it parses
        return value if isinstance(value, dict) else None
