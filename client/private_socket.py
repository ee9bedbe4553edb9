"""The worker's owner-only files: its folder (0700), Unix socket (0600), lock files and log.

Both ends of the forwarder <-> worker link use this module (stdlib only, so the per-message
forwarder stays light). Files of one worker live in one folder, created owner-only and refused
when another user owns it or it is open to others; the socket's peer is identified by the
kernel (SO_PEERCRED on Linux, LOCAL_PEERCRED on macOS) and refused unless it runs as this user.

Two locks, both `fcntl.flock` on files in that folder:
- `worker.lock` is held by a live worker for its whole life, taken before anything else; a
  second worker for the same folder sees it held and exits.
- `start.lock` is held by whoever checks whether a worker runs and starts one, so two
  forwarders that find no worker start one between them, not two.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SOCKET_NAME = "worker.sock"
MAX_SOCKET_PATH = 100  # sun_path holds 104 (macOS) / 108 (Linux) bytes with its NUL


class PeerRefused(PermissionError):
    """The other end of the socket runs as another user (or its user cannot be told)."""


@dataclass(frozen=True)
class WorkerFiles:
    """Where one worker's socket, locks and log are: all in one owner-only folder."""

    socket: Path

    @property
    def folder(self) -> Path:
        return self.socket.parent

    @property
    def log(self) -> Path:
        return self.folder / "worker.log"

    @property
    def worker_lock(self) -> Path:
        return self.folder / "worker.lock"

    @property
    def start_lock(self) -> Path:
        return self.folder / "start.lock"


def worker_files(folder: str | Path) -> WorkerFiles:
    """The worker files in `folder`; a folder whose socket path would be too long for the
    kernel gets a short one under the temp folder (`fedsite-<uid>/<hash>`) instead."""
    folder = Path(folder).expanduser().absolute()
    path = folder / SOCKET_NAME
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        import hashlib

        digest = hashlib.sha256(os.fsencode(folder)).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / f"fedsite-{os.getuid()}" / digest / SOCKET_NAME
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"worker socket path {path} is longer than {MAX_SOCKET_PATH} bytes")
    return WorkerFiles(path)


def private_folder(folder: Path) -> Path:
    """Create `folder` (and missing parents) owner-only; refuse one that is not ours or is open to others."""
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{folder} is not a folder (a symlink?); refusing it for the worker socket")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{folder} belongs to uid {info.st_uid}, not to this user; refusing it for the worker socket")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)  # ours: mkdir's mode went through the umask, or someone opened it
    parent = os.stat(folder.parent)  # whoever may rename entries in the parent could swap the folder
    others_may_rename = parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not parent.st_mode & stat.S_ISVTX
    if parent.st_uid not in (0, os.getuid()) or others_may_rename:
        raise PermissionError(f"{folder.parent} may be changed by other users; refusing it for the worker socket")
    return folder


def private_file(path: Path, flags: int = os.O_RDWR) -> int:
    """Open (creating 0600) a file in a private folder, never through a symlink."""
    return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def listen(path: Path, backlog: int = 8) -> socket.socket:
    """Bind a Unix socket at `path`, 0600 before it listens (the caller holds the worker lock,
    so a socket file left there is a dead worker's and is replaced)."""
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if not stat.S_ISSOCK(info.st_mode):
            raise PermissionError(f"{path} exists and is not a socket; refusing to replace it")
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.listen(backlog)
    return server


def connect(path: Path, timeout: float) -> tuple[socket.socket, int]:
    """Connect to the worker at `path`, check that it runs as this user: (socket, its pid).

    FileNotFoundError / ConnectionRefusedError: no worker listens there.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        pid = check_peer(peer_credentials(sock))
    except BaseException:
        sock.close()
        raise
    return sock, pid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel says; pid -1 where the
    platform does not tell it. PeerRefused where the platform cannot tell the user."""
    if hasattr(socket, "SO_PEERCRED"):  # Linux
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return pid, uid, gid
    if sys.platform == "darwin" and hasattr(socket, "LOCAL_PEERCRED"):
        # struct xucred { u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]; }
        raw = sock.getsockopt(0, socket.LOCAL_PEERCRED, struct.calcsize("IIh16I"))
        _, uid, ngroups, *groups = struct.unpack("IIh16I", raw)
        pid = -1
        if hasattr(socket, "LOCAL_PEERPID"):
            pid = struct.unpack("i", sock.getsockopt(0, socket.LOCAL_PEERPID, 4))[0]
        return pid, uid, groups[0] if ngroups else -1
    raise PeerRefused(f"cannot tell the user of a socket peer on {sys.platform}; refusing it")


def check_peer(credentials: tuple[int, int, int], uid: int | None = None) -> int:
    """The peer's pid when it runs as `uid` (default: this process's user); PeerRefused else."""
    pid, peer_uid, _ = credentials
    expected = os.getuid() if uid is None else uid
    if peer_uid != expected:
        raise PeerRefused(f"socket peer pid {pid} runs as uid {peer_uid}, not {expected}; refused")
    return pid


def lock_held(path: Path) -> bool:
    """Whether another open file holds an exclusive flock on `path` (a live worker on worker.lock)."""
    fd = private_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False


def try_lock(path: Path, patience: float = 0.0) -> int | None:
    """Take an exclusive flock on `path`, trying for `patience` seconds: the open fd (keep it
    open to keep the lock), or None when another process holds it.

    `lock_held` takes the lock for a moment to test it, so a worker starting at that moment
    would see it held: the worker tries for a second (a live worker holds it for good).
    """
    deadline = time.monotonic() + patience
    fd = private_file(path)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
        if time.monotonic() >= deadline:
            os.close(fd)
            return None
        time.sleep(0.01)


@contextlib.contextmanager
def locked(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block, waiting for it `timeout` seconds at most."""
    deadline = time.monotonic() + timeout
    while (fd := try_lock(path)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} stayed locked for {timeout:.0f}s")
        time.sleep(0.05)
    try:
        yield
    finally:
        os.close(fd)
