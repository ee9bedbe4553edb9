"""The worker's owner-only files: folder 0700, socket 0600 whatever the umask, peers of other
users refused, and the locks that keep one worker per folder."""

import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from client.private_socket import (
    MAX_SOCKET_PATH,
    PeerRefused,
    check_peer,
    connect,
    listen,
    lock_held,
    locked,
    peer_credentials,
    private_folder,
    try_lock,
    worker_files,
)
from client.wire import parse_reply, recv_frame, request_frame, send_frame
from client.worker import Worker


@pytest.fixture()
def folder():
    """A short folder (a Unix socket path must stay under ~100 bytes; pytest's tmp_path may not)."""
    with tempfile.TemporaryDirectory(prefix="fsw-", dir="/tmp") as path:
        yield Path(path) / "worker"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_folder_is_owner_only_even_under_an_open_umask_and_an_open_folder_is_closed(folder):
    old = os.umask(0)
    try:
        private_folder(folder)
    finally:
        os.umask(old)
    assert mode(folder) == 0o700
    os.chmod(folder, 0o755)
    private_folder(folder)
    assert mode(folder) == 0o700


def test_a_symlinked_folder_is_refused(folder):
    target = folder.parent / "elsewhere"
    target.mkdir()
    folder.symlink_to(target)
    with pytest.raises(PermissionError, match="not a folder"):
        private_folder(folder)


def test_the_socket_is_0600_before_it_listens_whatever_the_umask(folder):
    files = worker_files(private_folder(folder))
    old = os.umask(0)
    try:
        server = listen(files.socket)
    finally:
        os.umask(old)
    with server:
        assert stat.S_ISSOCK(os.lstat(files.socket).st_mode) and mode(files.socket) == 0o600
        sock, pid = connect(files.socket, 5)
        sock.close()
        assert pid == os.getpid()


def test_a_stale_socket_is_replaced_and_a_non_socket_is_not(folder):
    files = worker_files(private_folder(folder))
    listen(files.socket).close()  # a dead worker's socket file stays behind
    with pytest.raises(ConnectionRefusedError):
        connect(files.socket, 5)
    listen(files.socket).close()
    files.socket.unlink()
    files.socket.write_text("not a socket")
    with pytest.raises(PermissionError, match="not a socket"):
        listen(files.socket)


def test_peer_credentials_are_the_kernels_and_another_uid_is_refused():
    left, right = socket.socketpair()
    with left, right:
        pid, uid, gid = peer_credentials(left)
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())
    assert check_peer((pid, uid, gid)) == pid
    with pytest.raises(PeerRefused, match="runs as uid 4242"):
        check_peer((123, 4242, 4242))
    with pytest.raises(PeerRefused):
        check_peer((pid, uid, gid), uid=uid + 1)


def test_a_worker_refuses_a_peer_of_another_user_without_answering(folder):
    """The worker's own check on a real connection (the test cannot become another user, so the
    worker is told to expect one)."""
    files = worker_files(private_folder(folder))
    server = listen(files.socket)
    worker = Worker({}, uid=os.getuid() + 1)
    with server:
        serving = threading.Thread(target=worker.serve_one, args=(server,), daemon=True)
        serving.start()
        sock, _ = connect(files.socket, 5)
        with sock:
            try:
                send_frame(sock, request_frame("ping"), time.monotonic() + 5)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the worker checked our credentials and hung up before the request was out
            serving.join(10)
            assert closed_without_a_word(sock)
    assert worker.refused == 1


def closed_without_a_word(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with our request unread
        return True


OTHER_UID = 65534  # nobody
AS_NOBODY = """
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as err:
    print(type(err).__name__); sys.exit(0)
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
    print("answered" if s.recv(1) else "closed")
except (BrokenPipeError, ConnectionResetError):
    print("closed")
"""


def python_for_others() -> str | None:
    """A Python another user may run (this venv's may sit under root's private home)."""
    if os.getuid() != 0:
        return None
    for python in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            if subprocess.run([python, "-I", "-S", "-c", "pass"], user=OTHER_UID, group=OTHER_UID, capture_output=True, timeout=60).returncode == 0:
                return python
        except OSError:
            continue
    return None


def as_other_user(path: Path, data: bytes) -> str:
    command = [python_for_others(), "-I", "-S", "-c", AS_NOBODY, str(path), data.hex()]
    result = subprocess.run(command, user=OTHER_UID, group=OTHER_UID, capture_output=True, text=True, timeout=60)
    return result.stdout.strip() or result.stderr


@pytest.mark.skipif(python_for_others() is None, reason="becoming another user needs root and a Python that user may run")
def test_another_user_cannot_reach_the_socket_and_is_refused_by_the_worker_if_it_could(folder):
    files = worker_files(private_folder(folder))
    server = listen(files.socket)
    worker = Worker({})
    with server:
        assert as_other_user(files.socket, request_frame("ping")) == "PermissionError"  # folder 0700, socket 0600
        # open both up on purpose: then the worker's own peer check is what stands in the way
        os.chmod(folder.parent, 0o711)
        os.chmod(folder, 0o711)
        os.chmod(files.socket, 0o666)
        serving = threading.Thread(target=worker.serve_one, args=(server,), daemon=True)
        serving.start()
        assert as_other_user(files.socket, request_frame("ping")) == "closed"
        serving.join(10)
    assert worker.refused == 1 and worker.messages == 0


def test_a_worker_of_the_same_user_answers(folder):
    files = worker_files(private_folder(folder))
    server = listen(files.socket)
    worker = Worker({})
    with server:
        serving = threading.Thread(target=worker.serve_one, args=(server,), daemon=True)
        serving.start()
        sock, _ = connect(files.socket, 5)
        with sock:
            send_frame(sock, request_frame("ping"), time.monotonic() + 5)
            assert parse_reply(recv_frame(sock, time.monotonic() + 5))["pid"] == os.getpid()
        serving.join(10)


def test_the_worker_lock_is_held_by_one_holder_and_released_with_it(folder):
    files = worker_files(private_folder(folder))
    assert not lock_held(files.worker_lock)
    fd = try_lock(files.worker_lock)
    assert fd is not None and lock_held(files.worker_lock) and try_lock(files.worker_lock) is None
    assert mode(files.worker_lock) == 0o600
    os.close(fd)
    assert not lock_held(files.worker_lock)


def test_waiting_for_a_lock_is_bounded(folder):
    files = worker_files(private_folder(folder))
    fd = try_lock(files.start_lock)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            with locked(files.start_lock, 0.3):
                pass
        assert time.monotonic() - started < 2
    finally:
        os.close(fd)
    with locked(files.start_lock, 1):
        assert lock_held(files.start_lock)


def test_a_folder_too_deep_for_a_socket_path_gets_a_short_private_one(tmp_path):
    deep = tmp_path / ("x" * 120)
    files = worker_files(deep)
    assert len(os.fsencode(files.socket)) <= MAX_SOCKET_PATH
    assert files.folder.parent.name == f"fedsite-{os.getuid()}"
    assert worker_files(deep) == files  # the same folder every time


def test_a_folder_whose_parent_others_may_change_is_refused(folder):
    folder.parent.chmod(0o777)  # group/other-writable, no sticky bit: anyone could swap the folder
    with pytest.raises(PermissionError, match="may be changed by other users"):
        private_folder(folder)
    folder.parent.chmod(0o1777)  # sticky, as /tmp: others cannot rename what is ours
    assert private_folder(folder) == folder
