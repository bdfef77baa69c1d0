"""Subcommand ``moeblocks inspect``.

:func:`add_inspect_commands` adds it to the ``moeblocks`` parser's subparsers; it
sets ``handler`` to a function ``(args) -> exit status`` as the other commands do.
Heavy imports happen inside the handlers. ``inspect --hf DIR`` (a Hugging Face
checkpoint) is handled by a function the caller passes in, so that this package imports
no model bridge (the ``moeblocks`` command passes :mod:`moeblocks.hf`'s).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

__all__ = ["add_inspect_commands", "run_inspect"]


def run_inspect(args: argparse.Namespace) -> int:
    """Handler of ``moeblocks inspect RUN``: print the tables, write ``report.md`` + PNGs.

    With ``--hf DIR`` it hands over to ``args.hf_handler``.
    """
    from moeblocks.sra.config import UsageError

    if args.hf is not None:
        if args.run is not None:
            raise UsageError("give either a run folder or --hf DIR, not both")
        if args.hf_handler is None:
            raise UsageError("--hf needs the moeblocks command (moeblocks.cli)")
        return args.hf_handler(args)
    if args.run is None:
        raise UsageError(
            "give a run folder (moeblocks inspect RUN) or a Hugging Face checkpoint "
            "folder (moeblocks inspect --hf DIR)"
        )
    from moeblocks.inspect.probe import load_probes
    from moeblocks.inspect.report import format_inspection, inspect_run, write_inspect_report

    probes = load_probes(args.probes) if args.probes else None
    ins = inspect_run(
        Path(args.run),
        text=args.text,
        max_tokens=args.max_tokens,
        device=args.device,
        k_sweep=not args.no_k_sweep,
        probes=probes,
        data=args.data,
    )
    print(format_inspection(ins))
    out = Path(args.out) if args.out else Path(args.run) / "inspect"
    print(f"report: {write_inspect_report(ins, out)}")
    return 0


def add_inspect_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    hf_handler: Callable[[argparse.Namespace], int] | None = None,
) -> None:
    """Add ``inspect`` to the ``moeblocks`` subparsers.

    Args:
        sub: The subparsers of the ``moeblocks`` parser.
        hf_handler: Handler of ``inspect --hf DIR`` (None: ``--hf`` is refused).
    """
    ins = sub.add_parser(
        "inspect",
        help="routing metrics, probes and plots of a trained run or a Hugging Face MoE "
        "checkpoint (writes report.md)",
    )
    ins.add_argument("run", nargs="?", default=None, help="run folder, e.g. runs/NAME")
    ins.add_argument(
        "--hf",
        default=None,
        metavar="DIR",
        help="inspect a local Hugging Face checkpoint folder (save_pretrained) instead of a run",
    )
    ins.add_argument(
        "--data",
        default=None,
        help="with --hf: evaluation text: pydoc (default), synthetic, a text file or a folder; "
        "with a run: its data, when that lies outside the run folder",
    )
    ins.add_argument(
        "--seq-len", type=int, default=128, help="with --hf: tokens per window (default 128)"
    )
    ins.add_argument("--text", default=None, help="sentence to trace token by token")
    ins.add_argument(
        "--max-tokens", type=int, default=8192, help="validation tokens to inspect (default 8192)"
    )
    ins.add_argument("--probes", default=None, help="JSONL overlap-probe set (default: built-in)")
    ins.add_argument(
        "--out", default=None, help="report folder (default: RUN/inspect, DIR/inspect)"
    )
    ins.add_argument("--no-k-sweep", action="store_true", help="skip the k-sweep evaluation")
    ins.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    ins.set_defaults(handler=run_inspect, hf_handler=hf_handler)
