"""The ``moeblocks experiment`` command: named experiments on the reference SRA model.

One subcommand per experiment (``routing-ablation``, ``routing-zoo``); the options they
share are declared once in :func:`_add_common`. Heavy imports happen inside the
handlers, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moeblocks.cli.options import (
    RAW,
    add_device,
    add_max_tokens,
    add_quiet,
    add_threads,
    positive_int,
)
from moeblocks.cli.run import command_line

__all__ = ["add_experiment"]

_EXAMPLES = """examples:
  moeblocks experiment routing-ablation --seeds 0 1 2 --steps 300
  moeblocks experiment routing-ablation --preset small --data path/to/wikitext-103 \\
      --variants cosine+bandpass linear+bandpass --device cuda
  moeblocks experiment routing-zoo --preset tiny --seeds 0 1 2 --jobs 2
"""

_ZOO_EXAMPLES = """examples:
  moeblocks experiment routing-zoo --preset tiny --seeds 0 1 2 --jobs 2
  moeblocks experiment routing-zoo --families cosine mixtral dense --steps 100 --seeds 0 1
"""


def _ablation(args: argparse.Namespace) -> int:
    """Handler of ``moeblocks experiment routing-ablation``."""
    from moeblocks.sra.config import preset
    from moeblocks.sra.experiments import routing_ablation

    base = preset(args.preset)
    if args.steps is not None:
        base = base.replace(steps=args.steps)
    out = Path(args.out)
    runs = routing_ablation(
        out,
        base,
        seeds=args.seeds,
        data=args.data,
        variants=args.variants,
        max_tokens=args.max_tokens,
        device=args.device,
        progress=not args.quiet,
        command=command_line(),
    )
    print((out / "ablation.md").read_text(encoding="utf-8"))
    print(f"{len(runs)} runs; table in {out / 'ablation.md'}")
    return 0


def _zoo(args: argparse.Namespace) -> int:
    """Handler of ``moeblocks experiment routing-zoo``."""
    from moeblocks.runtime.threads import configure_threads
    from moeblocks.sra.routing_zoo import routing_zoo, zoo_base

    if args.jobs == 1:  # workers of --jobs N run one thread each
        configure_threads(args.threads)
    out = Path(args.out)
    runs = routing_zoo(
        out,
        zoo_base(args.preset, args.steps),
        seeds=args.seeds,
        data=args.data,
        families=args.families,
        max_tokens=args.max_tokens,
        device=args.device,
        jobs=args.jobs,
        progress=not args.quiet,
        command=command_line(),
    )
    print((out / "routing_zoo.md").read_text(encoding="utf-8"))
    print(f"{len(runs)} runs; table in {out / 'routing_zoo.md'}")
    return 0


def _add_common(p: argparse.ArgumentParser, out: str) -> None:
    """The options every experiment takes."""
    from moeblocks.sra.config import PRESETS

    p.add_argument(
        "--preset", default="tiny", choices=sorted(PRESETS), help="base config (default: tiny)"
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (default: 0 1 2)"
    )
    p.add_argument("--data", default="pydoc", help="corpus (default: pydoc)")
    add_max_tokens(p, 16384, "validation tokens per measurement")
    p.add_argument("--out", default=out, help=f"folder for the runs (default: {out})")
    add_device(p)
    add_quiet(p)


def _add_ablation(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from moeblocks.sra.experiments import ABLATION_VARIANTS

    p = sub.add_parser(
        "routing-ablation",
        help="cosine vs linear router, bandpass on vs off, dense, over seeds",
        description="The SRA paper's comparison (cosine vs linear router, bandpass on vs "
        "off, a dense FFN of equal active parameters) over several seeds; writes "
        "ablation.md (mean ± 95 percent interval per cell), .csv, .json and .png.",
        epilog=_EXAMPLES,
        formatter_class=RAW,
    )
    _add_common(p, "runs/routing-ablation")
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=list(ABLATION_VARIANTS),
        metavar="VARIANT",
        help=f"variants to run (default: all: {', '.join(ABLATION_VARIANTS)})",
    )
    p.add_argument("--steps", type=positive_int, default=None, help="override the preset's steps")
    p.set_defaults(handler=_ablation)


def _add_zoo(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from moeblocks.sra.routing_zoo import TINY_STEPS, zoo_families

    families = zoo_families()
    p = sub.add_parser(
        "routing-zoo",
        help="every MoE routing family and a dense FFN, side by side over seeds",
        description="Trains the reference decoder with every routing family's FFN (and a "
        "dense FFN of equal active size) at every seed on the same data, then measures "
        "each run: perplexity, dead experts, load imbalance, router entropy, class "
        "purity, the sense probe's Jaccard gap, throughput, dropped tokens. Writes "
        "routing_zoo.md (mean ± 95 percent interval per family, and which differences "
        "from cosine hold), .csv, .json and .png. A rerun skips finished runs.",
        epilog=_ZOO_EXAMPLES,
        formatter_class=RAW,
    )
    _add_common(p, "runs/routing-zoo")
    p.add_argument(
        "--families",
        nargs="+",
        default=None,
        choices=list(families),
        metavar="FAMILY",
        help=f"families to run (default: all: {', '.join(families)})",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help=f"steps per run (default: {TINY_STEPS} at tiny, else the preset's)",
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        metavar="N",
        help="runs trained at once, each in its own process with one thread (default: 1)",
    )
    add_threads(p)
    p.set_defaults(handler=_zoo)


def add_experiment(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``experiment`` to the ``moeblocks`` subparsers."""
    ex = sub.add_parser(
        "experiment",
        help="named experiments on the SRA model: routing-ablation, routing-zoo",
        description="routing-ablation: the SRA paper's comparison of routers and balance "
        "losses; routing-zoo: every MoE routing family side by side. Each writes a table "
        "of mean ± 95 percent interval over seeds, with its runs and a chart.",
        epilog=_EXAMPLES,
        formatter_class=RAW,
    )
    names = ex.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    _add_ablation(names)
    _add_zoo(names)
