"""Subcommand ``moeblocks inspect``.

:func:`add_inspect_commands` adds it to the ``moeblocks`` parser's subparsers; it
sets ``handler`` to a function ``(args) -> exit status`` as the other commands do.
Heavy imports happen inside the handlers. The report goes to ``RUN/reports/inspect.md``
with its plots beside it (``inspect-*``, ``training-*``; see :mod:`moeblocks.sra.evaluate`
for the layout of a run's reports). ``inspect --hf DIR`` (a Hugging Face checkpoint)
is handled by a function the caller passes in, so that this package imports no model
bridge (the ``moeblocks`` command passes :mod:`moeblocks.hf`'s).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from moeblocks._argtypes import positive_int

__all__ = ["add_inspect_commands", "run_inspect"]

_EXAMPLES = """examples:
  moeblocks inspect runs/demo
  moeblocks inspect runs/demo --text "the cat sat on the mat" --max-tokens 4096
  moeblocks inspect runs/demo --format svg --no-k-sweep --out /tmp/report
  moeblocks inspect --hf path/to/checkpoint --data pydoc --seq-len 256

writes (default folder RUN/reports, or DIR/reports with --hf):
  inspect.md                 the tables below and every plot
  inspect-utilisation.png    share of routed slots per expert id, mean router probability,
                             bandpass corridor
  inspect-anchors.png        cosine similarity of the anchors (cosine routers)
  inspect-classes-layerN.png NPMI of experts x word classes (synthetic corpus)
  inspect-k-sweep.png        perplexity against the inference-time k
  inspect-routing-map.png    all k experts of every token of --text, by layer
  training-*.png             curves, utilisation, dead experts and entropy from log.jsonl
"""


def run_inspect(args: argparse.Namespace) -> int:
    """Handler of ``moeblocks inspect RUN``: print the tables, write ``inspect.md`` + plots.

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
    from moeblocks.sra.evaluate import report_dir

    probes = load_probes(args.probes) if args.probes else None
    ins = inspect_run(
        Path(args.run),
        text=args.text,
        max_tokens=args.max_tokens,
        device=args.device,
        k_sweep=not args.no_k_sweep,
        probes=probes,
        data=args.data,
        progress=not args.quiet,
    )
    print(format_inspection(ins))
    out = Path(args.out) if args.out else report_dir(Path(args.run))
    print(f"report: {write_inspect_report(ins, out, args.format)}")
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
        "checkpoint (writes RUN/reports/inspect.md)",
        description="Collect the routing of every MoE layer over the start of the "
        "validation split and report utilisation, dead experts, router saturation and "
        "entropy, vocabulary entropy, subtoken coherence, overlap probes, the "
        "inference-time k-sweep and a token-by-token trace of one sentence. Perplexities "
        "are over --max-tokens tokens (eval reads the whole split), so they can differ "
        "from eval's; both say how many tokens they used.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        "--seq-len",
        type=positive_int,
        default=128,
        help="with --hf: tokens per window (default 128)",
    )
    ins.add_argument("--text", default=None, help="sentence to trace token by token")
    ins.add_argument(
        "--max-tokens",
        type=positive_int,
        default=8192,
        metavar="N",
        help="validation tokens to inspect (default 8192)",
    )
    ins.add_argument("--probes", default=None, help="JSONL overlap-probe set (default: built-in)")
    ins.add_argument(
        "--out", default=None, help="report folder (default: RUN/reports, DIR/reports)"
    )
    ins.add_argument(
        "--format",
        default="png",
        choices=["png", "svg", "pdf"],
        help="plot format (default: png at 150 dpi)",
    )
    ins.add_argument("--no-k-sweep", action="store_true", help="skip the k-sweep evaluation")
    ins.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    ins.add_argument("--quiet", action="store_true", help="no progress bar")
    ins.set_defaults(handler=run_inspect, hf_handler=hf_handler)
