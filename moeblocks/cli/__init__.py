"""The ``moeblocks`` command line: one package of commands on SRA runs and MoE checkpoints.

One package of commands (:mod:`moeblocks.cli.parser` assembles them, the options they
share are declared once in :mod:`moeblocks.cli.options`); :func:`main` runs one and turns
the errors every command shares into exit statuses. Nothing in the library imports it.

Every field of :class:`~moeblocks.sra.config.SRAConfig` can be set for ``train``: a
preset, then ``--config FILE.json`` (an object of fields), then ``--set key=value``
(repeatable, each value parsed by the field's type), then the named flags (``--steps``,
``--seed``, ``--ffn``...), each overriding the one before.

Reports of a run go to ``RUN/reports/``: ``eval.json`` (``eval``, ``demo``), ``demo.md``,
``inspect.md``, ``generate.md`` + ``generate.json``, and their plots
(``<command>-<concept>.png``, ``training-*.png``); see :mod:`moeblocks.sra.evaluate`.
Long commands show a progress bar on stderr when it is a terminal (a plain line every
10 % or 30 s otherwise, see :mod:`moeblocks.runtime.progress`) unless ``--quiet``.

Bad input (a missing data path, an unknown preset, a checkpoint from another config or
one that does not verify...) prints one line to stderr and exits with status 2. Ctrl-C,
SIGTERM or SIGUSR1 during training save a checkpoint and exit with status 128 + the
signal number (130, 143, 138); a run that diverges (too many non-finite steps in a row)
exits with status 3, its earlier checkpoints kept.

Every command run from the shell sets its CPU threads with
:func:`moeblocks.runtime.threads.configure_threads`: ``--threads N``, else ``OMP_NUM_THREADS``,
else the CPUs this process may use that other processes do not keep busy; in that last
case ``train`` and ``demo`` look at the load again every few seconds.
It also lets glibc's malloc keep freed memory for reuse
(:func:`moeblocks.runtime.malloc.configure_malloc`), unless the environment sets the allocator's
own ``MALLOC_*_`` variables or preloads another allocator. ``main(argv)`` called from
Python changes threads only when ``--threads`` is given, and leaves the allocator alone.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from moeblocks.cli.parser import build_parser

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT; other signals exit with 128 + their number

_parser = build_parser  # the name the docs hook and older callers use


def _error(message: str) -> int:
    print(f"moeblocks: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moeblocks`` console script; returns the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``). Given from Python, the
            process's threads change only with ``--threads`` (see the module docstring).
    """
    args = _parser().parse_args(argv)
    if argv is None:  # the process is ours: keep freed memory for reuse
        from moeblocks.runtime.malloc import configure_malloc

        configure_malloc()
    if argv is None or getattr(args, "threads", None) is not None:
        from moeblocks.runtime.threads import configure_threads

        configure_threads(getattr(args, "threads", None))
    # A count picked from the load is looked at again during training (ThreadTuner).
    args.tune_threads = (
        argv is None
        and getattr(args, "threads", None) is None
        and not os.environ.get("OMP_NUM_THREADS")
    )
    from moeblocks.runtime.errors import UsageError
    from moeblocks.sra.guards import DivergedError

    try:
        return args.handler(args)
    except UsageError as err:
        return _error(str(err))
    except DivergedError as err:
        print(f"moeblocks: error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except ImportError as err:
        if "moeblocks[" not in str(err):  # not a missing extra: a real bug, keep the trace
            raise
        return _error(str(err))
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        print(f"\nmoeblocks: interrupted ({name}){_resume_hint(args)}", file=sys.stderr)
        return 128 + signum


def _resume_hint(args: argparse.Namespace) -> str:
    from moeblocks.runtime.errors import UsageError
    from moeblocks.sra.checkpoint import find_checkpoint

    out = getattr(args, "out", None)
    try:
        ckpt = find_checkpoint(Path(out)) if out and Path(out).is_dir() else None
    except UsageError:
        ckpt = None
    if ckpt is None:
        return " before the first checkpoint"
    data = f" --data {ckpt.data}" if getattr(args, "data", None) else ""
    return f"; step {ckpt.step} saved (continue: moeblocks train --out {out} --resume{data})"
