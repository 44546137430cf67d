"""Durable, atomic file writes: readers see the old file or the new one, never a torn mix.

The lowest layer of raysim: it imports nothing of ours, so every module (client state, checkpoints, the
run folder) may use it. A file is written to a temporary name beside its target, fsynced, renamed over
the target and the rename made durable by fsyncing the folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a folder so that the names in it are durable) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str | Callable[[BinaryIO], object], *, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    ``data`` is bytes, text (written as UTF-8) or a callable that writes the content to the binary file
    it is given (``lambda f: np.save(f, array)``), so a serializer streams into the file unchanged.
    ``mode`` (less the umask) applies from the moment the file exists, e.g. 0o600 for a key.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
