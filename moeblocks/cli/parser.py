"""The ``moeblocks`` argument parser: one subcommand per command module, ``--threads`` on all.

The commands live in :mod:`moeblocks.cli.run` (``demo``, ``train``, ``eval``,
``generate``), :mod:`moeblocks.cli.inspect` and :mod:`moeblocks.cli.experiment`; the
options they share are declared once in :mod:`moeblocks.cli.options`. The docs' command
reference (``docs/cli.md``) is generated from :func:`build_parser`.
"""

from __future__ import annotations

import argparse

from moeblocks._version import __version__
from moeblocks.cli.experiment import add_experiment
from moeblocks.cli.inspect import add_inspect
from moeblocks.cli.options import RAW, add_threads
from moeblocks.cli.run import add_demo, add_eval, add_generate, add_train

__all__ = ["build_parser"]

COMMANDS = (add_demo, add_train, add_eval, add_generate, add_inspect, add_experiment)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``moeblocks`` command, every subcommand with its handler."""
    parser = argparse.ArgumentParser(
        prog="moeblocks",
        description="Mixture-of-Experts blocks: train, evaluate, inspect and sample the "
        "reference SRA (Semantic Resonance Architecture) transformer.",
        epilog=_MAIN_EXAMPLES,
        formatter_class=RAW,
    )
    parser.add_argument("--version", action="version", version=f"moeblocks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():
        add_threads(command)
    return parser


_MAIN_EXAMPLES = """examples:
  moeblocks demo                                     train the tiny model and report (~2 min)
  moeblocks train --out runs/a --preset small --set seq_len=512 --set lr=1e-3
  moeblocks eval runs/a                              perplexity, dead experts, k-sweep
  moeblocks inspect runs/a --text "the cat sat"      routing metrics and plots
  moeblocks generate runs/a --prompt "The" --seed 1  sample text, trace the experts
  moeblocks experiment routing-ablation --seeds 0 1 2

reports go to RUN/reports/: eval.json, demo.md, inspect.md, generate.md/.json and plots.
`moeblocks COMMAND --help` describes each command.
"""
