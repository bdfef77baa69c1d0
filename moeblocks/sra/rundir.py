"""The run folder: what may become one, who holds it, and what a (re)start clears.

A run folder carries the marker file ``moeblocks-run.json``. Training starts only in a
folder that does not exist yet, an empty folder, or a marked one, so it never mixes its
files into someone else's (or deletes them with ``overwrite``). Path problems are found
by :func:`check_out` before any work starts and before anything is written.

While a run trains, the process holds an exclusive lock on the marker (``flock``; POSIX
only), so a second process cannot train into the same folder and delete its in-flight
temporary files. :func:`claim_run` takes the lock, removes what killed processes left
behind (:func:`remove_stale`) and clears or truncates the log.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moeblocks._version import __version__
from moeblocks.runtime.durable import atomic_write_text
from moeblocks.runtime.errors import UsageError

__all__ = [
    "MARKER",
    "RUN_FILES",
    "check_out",
    "claim_run",
    "remove_run_files",
    "remove_stale",
    "run_summary",
    "truncate_log",
]

MARKER = "moeblocks-run.json"

# Everything a run writes into its folder besides the marker; removed by
# `remove_run_files` when a fresh run starts in a run folder (e.g. demo reruns).
RUN_FILES = (
    "checkpoint.json",
    "tokenizer.json",
    "log.jsonl",
    "report.md",
    "loss.png",
    "experts.png",
)


def check_out(out: Path, *, resume: bool) -> None:
    """Raise :class:`UsageError` for an ``--out`` training cannot use; writes nothing.

    Refused: a path that is a file (or whose parent is), a folder that cannot be
    written (or created), and a non-empty folder without the run marker.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out} is not writable")
        if not (out / MARKER).is_file() and any(out.iterdir()):
            if resume:
                raise UsageError(f"--resume: {out} is not a moeblocks run folder (no {MARKER})")
            raise UsageError(
                f"--out {out} is not empty and is not a moeblocks run folder (no {MARKER}); "
                "choose a new or empty folder"
            )
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out} cannot be created: {parent} is not writable")


@contextmanager
def claim_run(out: Path, *, resume_step: int | None) -> Iterator[None]:
    """Make ``out`` a run folder, hold its lock, and prepare it for training.

    Args:
        out: The run folder (checked by :func:`check_out`).
        resume_step: The step a resume starts from (``log.jsonl`` is cut back to it),
            or None for a fresh run (the files of any earlier run are removed).

    Raises:
        UsageError: When another process holds the folder.
    """
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if not marker.is_file():
        atomic_write_text(marker, json.dumps({"format": 1, "moeblocks": __version__}) + "\n")
    with open(marker, "rb") as lock:
        _lock(lock.fileno(), out)
        remove_stale(out)
        if resume_step is None:
            remove_run_files(out)
        else:
            truncate_log(out / "log.jsonl", resume_step)
        yield


def _lock(fd: int, out: Path) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(f"--out {out} is in use by another training process") from None


def remove_stale(out: Path) -> None:
    """Delete what killed processes left: temporary and half-deleted checkpoints, temp files."""
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        for p in ckpts.iterdir():
            if p.name.startswith((".tmp-", ".del-", ".old-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(".*.tmp"):  # atomic_write_text's temporary files
        if p.is_file():
            p.unlink(missing_ok=True)


def remove_run_files(out: Path) -> None:
    """Delete what an earlier run wrote into ``out`` (and nothing else)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "reports", ignore_errors=True)  # eval/inspect/demo/generate reports


def truncate_log(path: Path, step: int) -> None:
    """Cut ``log.jsonl`` back to the records of steps <= ``step`` (a resume writes the rest).

    A last line torn by a crash (not valid JSON) is dropped too.
    """
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def run_summary(out: Path) -> dict[str, Any]:
    """The log records of a run, for reports.

    Returns:
        The records of applied steps, those with a validation pass, and those of
        skipped (non-finite) steps, as ``{"train": [...], "eval": [...], "skipped": [...]}``.
    """
    path = out / "log.jsonl"
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:  # a line torn by a crash
            continue
    applied = [r for r in records if "skipped" not in r]
    return {
        "train": applied,
        "eval": [r for r in applied if "val_loss" in r],
        "skipped": [r for r in records if "skipped" in r],
    }
