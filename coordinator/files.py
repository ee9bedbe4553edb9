"""Files the coordinator writes that must never be half-written, world-readable or redirected.

`write_atomic` writes into a temporary file beside the target, created with
`O_CREAT | O_EXCL | O_NOFOLLOW` and its final mode (0600 by default), so the contents never
exist with looser permissions, not even for a moment, and a symbolic link planted at the
temporary name is not followed. Once the data is flushed to disk the temporary file becomes the
target in one step: `os.replace` (replacing whatever is there; a symbolic link at the target is
itself replaced, never followed), or, with `replace=False`, `os.link`, which refuses an existing
target of any kind. A crash at any point leaves the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def temporary_path(path: Path) -> Path:
    """Where `write_atomic` stages `path` (one fixed name, so a killed write leaves no pile-up)."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object] | bytes, mode: int = 0o600, *, replace: bool = True) -> Path:
    """Write `path` atomically with permissions `mode` from the start (see the module docstring).

    `write` is the bytes to write or a function that writes into the open binary file. With
    `replace=False` an existing `path` (file, folder or symbolic link, even a dangling one)
    raises FileExistsError and is left as it is.
    """
    path = Path(path)
    tmp = temporary_path(path)
    tmp.unlink(missing_ok=True)  # a previous write that was killed; a link there is removed, not followed
    fd = os.open(tmp, CREATE_FLAGS, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            if isinstance(write, bytes):
                file.write(write)
            else:
                write(file)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # never onto an existing name, never through a link
    finally:
        tmp.unlink(missing_ok=True)
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
