"""The ``moeblocks inspect`` command: the routing report of an SRA run or an HF checkpoint.

:func:`add_inspect` adds it to the ``moeblocks`` parser's subparsers; it sets
``handler`` to a function ``(args) -> exit status`` as the other commands do. Heavy
imports happen inside the handler. A run is inspected by
:func:`moeblocks.sra.inspection.inspect_run`, a Hugging Face checkpoint (``--hf DIR``) by
:func:`moeblocks.hf.report.inspect_hf`; both give the model-agnostic
:class:`~moeblocks.inspect.report.Inspection` that
:func:`~moeblocks.inspect.report.write_inspect_report` writes to ``RUN/reports/inspect.md``
(or ``DIR/reports``) with its plots beside it (``inspect-*``, ``training-*``; see
:mod:`moeblocks.sra.evaluate` for the layout of a run's reports).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moeblocks.cli.options import (
    add_device,
    add_max_tokens,
    add_plot_format,
    add_quiet,
    positive_int,
)
from moeblocks.runtime.errors import UsageError

__all__ = ["add_inspect"]

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


def _inspect(args: argparse.Namespace) -> int:
    """Handler of ``moeblocks inspect``: print the tables, write ``inspect.md`` + plots."""
    from moeblocks.inspect.probe import load_probes
    from moeblocks.inspect.report import format_inspection, write_inspect_report

    if args.hf is not None and args.run is not None:
        raise UsageError("give either a run folder or --hf DIR, not both")
    if args.hf is None and args.run is None:
        raise UsageError(
            "give a run folder (moeblocks inspect RUN) or a Hugging Face checkpoint "
            "folder (moeblocks inspect --hf DIR)"
        )
    probes = load_probes(args.probes) if args.probes else None
    ins = _inspect_hf(args, probes) if args.hf is not None else _inspect_run(args, probes)
    print(format_inspection(ins))
    if args.out:
        out = Path(args.out)
    elif args.hf is not None:
        out = Path(args.hf) / "reports"
    else:
        from moeblocks.sra.evaluate import report_dir

        out = report_dir(Path(args.run))
    print(f"report: {write_inspect_report(ins, out, args.format)}")
    return 0


def _inspect_run(args: argparse.Namespace, probes: Any) -> Any:
    from moeblocks.sra.inspection import inspect_run

    return inspect_run(
        Path(args.run),
        text=args.text,
        max_tokens=args.max_tokens,
        device=args.device,
        k_sweep=not args.no_k_sweep,
        probes=probes,
        data=args.data,
        progress=not args.quiet,
    )


def _inspect_hf(args: argparse.Namespace, probes: Any) -> Any:
    """``--hf DIR``: the routing report of a local HF MoE checkpoint."""
    from moeblocks.hf.report import inspect_hf
    from moeblocks.runtime.device import resolve_device
    from moeblocks.sra.data import load_corpus

    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {args.seq_len}")
    # HF's own forward runs here; a bar would only show the k-sweep, so none.
    corpus = load_corpus(args.data or "pydoc")
    return inspect_hf(
        Path(args.hf),
        corpus.valid,
        data_name=corpus.name,
        text=args.text,
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        device=resolve_device(args.device),
        k_sweep=not args.no_k_sweep,
        probes=probes,
    )


def add_inspect(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``inspect`` to the ``moeblocks`` subparsers."""
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
    add_max_tokens(ins, 8192, "validation tokens to inspect (default 8192)")
    ins.add_argument("--probes", default=None, help="JSONL overlap-probe set (default: built-in)")
    ins.add_argument(
        "--out", default=None, help="report folder (default: RUN/reports, DIR/reports)"
    )
    add_plot_format(ins, "png at 150 dpi")
    ins.add_argument("--no-k-sweep", action="store_true", help="skip the k-sweep evaluation")
    add_device(ins)
    add_quiet(ins)
    ins.set_defaults(handler=_inspect)
