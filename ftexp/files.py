"""Two chores many parts of ftexp share: files and folders written whole, and file locks.

Written whole: ``atomic_path`` / ``atomic_write`` for a file and ``atomic_dir`` for a folder
write under a temporary name beside the target and rename it into place when the block ends
without an error, so a reader, a kill or a full disk never leaves half a file or a folder that
looks complete (metrics.json, the GGUF conversion, the tiny base model, an export).

Locks: ``hold`` takes an exclusive advisory lock (``flock``) on a lock file and returns the open
file, which holds it until it is closed or its process ends (the kernel drops it then, so a killed
run never leaves a stale lock); ``locked`` holds one for a block. Parallel sweep workers take turns
with them (a conversion, the measured CPU peak, claiming trials from an SQLite
study), a run folder admits one live run, and a worker keeps its GPU slot.
"""

from __future__ import annotations

import fcntl
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


class Busy(Exception):
    """The lock is held by another process (``wait=False``)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


def hold(path: Path, wait: bool = True) -> IO[str] | None:
    """The open lock file ``path``, exclusively locked; None when ``wait`` is False and another
    process holds it. Opened for appending and reading: a holder may write who it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except BaseException:
        handle.close()
        raise
    return handle


@contextmanager
def locked(path: Path, wait: bool = True) -> Iterator[IO[str]]:
    """Hold the lock on ``path`` for the block (see ``hold``); with ``wait=False`` a lock held
    elsewhere raises ``Busy``, naming what its holder wrote into the file."""
    handle = hold(path, wait)
    if handle is None:
        holder = Path(path).read_text().strip() if Path(path).exists() else ""
        raise Busy(Path(path), holder or "another process")
    try:
        yield handle
    finally:
        handle.close()  # closing releases the lock


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file to. When the block ends without an error it
    replaces ``path`` in one step, so a reader, or another process writing the same file, never
    sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")  # same suffix: same format
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` whole (``atomic_path``)."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill. When the block ends without an error it takes the
    place of ``path`` (whatever was there is removed first); on an error it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir(parents=True)
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
