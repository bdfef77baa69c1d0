"""Durable files: written whole or not at all, on disk before they count, checksummed.

A file is *durable* once its bytes and the folder entry that names it have reached the
disk (``fsync`` of the file, then of its folder). :func:`atomic_write_text` writes a file
under a temporary name, makes it durable and only then moves it into place with
``os.replace``, so a reader (or a crash) sees the old file or the new one, never half of
one. :func:`sha256_file` gives the checksums that checkpoint manifests record.

Folder ``fsync`` is a POSIX notion; elsewhere (Windows) it is skipped.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_text", "fsync_dir", "fsync_file", "sha256_file"]

_CHUNK = 1 << 20  # bytes read at a time when hashing


def fsync_file(path: Path) -> None:
    """Flush a written file's bytes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (creations, renames, deletions) to disk (POSIX only)."""
    if os.name == "posix":  # a folder opens read-only like a file there
        fsync_file(path)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` durably: ``write(file)`` into a temporary file, ``fsync``, ``os.replace``.

    The temporary file is ``.NAME.*.tmp`` beside ``path``; one left by a killed process
    is removed by :func:`moeblocks.sra.rundir.remove_stale` when the next run starts.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a run folder is shareable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` durably, see :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
