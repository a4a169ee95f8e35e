"""Atomic file writes, the one implementation the whole project uses (torch-free).

Every file is written to a temporary file in its destination folder and then renamed over the
target (``os.replace``, atomic on POSIX), so a reader never sees a half-written file, even if
the writer is killed; on an error the temporary file is removed and the target is untouched.
A writer killed between the two (kill -9) leaves its ``.NAME.*.tmp``: the index's writers remove
those of manifest.json when they next hold the lock (runtime.indexdir). ``fsync_folder`` makes
a rename durable.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager

import numpy as np

_UMASK = os.umask(0o022)  # read the process umask (there is no getter) and put it back at once
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file; mkstemp gives 0600


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Yield an open temp file next to ``path`` ("wb" or "w", UTF-8); rename it over ``path`` on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def save_npy(path: str | os.PathLike, array) -> None:
    """np.save(array) to ``path`` as given (no .npy appended), never pickling."""
    with atomic_open(path, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def fsync_folder(folder: str | os.PathLike) -> None:
    """fsync a folder, so that the renames and new names in it survive a crash (where the file
    system allows opening a folder; elsewhere nothing)."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
