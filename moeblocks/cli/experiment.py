"""The ``moeblocks experiment`` command: named experiments on the reference SRA model.

Heavy imports happen inside the handler, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moeblocks.cli.options import add_device, add_max_tokens, add_quiet, positive_int
from moeblocks.cli.run import command_line

__all__ = ["add_experiment"]

_EXAMPLES = """examples:
  moeblocks experiment routing-ablation --seeds 0 1 2 --steps 300
  moeblocks experiment routing-ablation --preset small --data path/to/wikitext-103 \\
      --variants cosine+bandpass linear+bandpass --device cuda
"""


def _experiment(args: argparse.Namespace) -> int:
    """Handler of ``moeblocks experiment NAME``."""
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


def add_experiment(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``experiment`` to the ``moeblocks`` subparsers."""
    from moeblocks.sra.config import PRESETS
    from moeblocks.sra.experiments import ABLATION_VARIANTS

    ex = sub.add_parser(
        "experiment",
        help="named experiments on the SRA model, e.g. routing-ablation",
        description="routing-ablation: the SRA paper's comparison (cosine vs linear router, "
        "bandpass on vs off, a dense FFN of equal active parameters) over several seeds; "
        "writes ablation.md (mean ± 95 percent interval per cell), .csv, .json and .png.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("name", choices=["routing-ablation"], help="which experiment")
    ex.add_argument(
        "--preset", default="tiny", choices=sorted(PRESETS), help="base config (default: tiny)"
    )
    ex.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (default: 0 1 2)"
    )
    ex.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=list(ABLATION_VARIANTS),
        metavar="VARIANT",
        help=f"variants to run (default: all: {', '.join(ABLATION_VARIANTS)})",
    )
    ex.add_argument("--data", default="pydoc", help="corpus (default: pydoc)")
    ex.add_argument("--steps", type=positive_int, default=None, help="override the preset's steps")
    add_max_tokens(ex, 16384, "validation tokens per measurement")
    ex.add_argument("--out", default="runs/routing-ablation", help="folder for the runs")
    add_device(ex)
    add_quiet(ex)
    ex.set_defaults(handler=_experiment)
