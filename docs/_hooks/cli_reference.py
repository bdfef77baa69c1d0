"""MkDocs hook: write the command-line reference from the ``moeblocks`` argument parser.

The page ``cli.md`` holds the marker ``<!-- cli-reference -->``; at build time it is
replaced by one section per command and subcommand (walked recursively through
``argparse`` subparsers): its one-line summary, its description, a table of its
arguments and its full ``--help`` text. The parser is built by
``moeblocks.cli.parser.build_parser``, so the page always matches the installed command.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Iterator
from typing import Any

MARKER = "<!-- cli-reference -->"
PAGE = "cli.md"
HELP_WIDTH = "88"  # columns of the --help text on the page


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """``(names, summary, parser)`` for every subcommand below ``parser``, depth first.

    ``names`` is the path of subcommand names from ``parser`` down (``("experiment",)``);
    aliases of one subcommand are listed once.
    """
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        summaries = {a.dest: a.help or "" for a in action._choices_actions}
        seen: set[int] = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            yield (*path, name), summaries.get(name, ""), sub
            yield from subcommands(sub, (*path, name))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _expand(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """An argument's help text as ``--help`` shows it (``%(default)s`` and the like filled)."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    return parser._get_formatter()._expand_help(action)


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    metavar = ""
    if action.nargs != 0:
        if action.choices is not None and action.metavar is None:
            metavar = " {" + ",".join(map(str, action.choices)) + "}"
        else:
            metavar = f" {action.metavar or action.dest.upper()}"
        if action.nargs in ("*", "+"):
            metavar += " ..."
    return ", ".join(f"`{flag}{metavar}`" for flag in action.option_strings)


def argument_table(parser: argparse.ArgumentParser) -> str:
    """A Markdown table of the parser's arguments (positionals first), or ``""``."""
    rows = []
    skip = (argparse._SubParsersAction, argparse._HelpAction)  # -h is on every command
    actions = [a for a in parser._actions if not isinstance(a, skip)]
    for action in sorted(actions, key=lambda a: bool(a.option_strings)):
        if action.help == argparse.SUPPRESS:
            continue
        help_text = _expand(parser, action)
        if action.required and action.option_strings:
            help_text = f"**required**; {help_text}"
        rows.append(f"| {_flags(action)} | {_cell(help_text)} |")
    if not rows:
        return ""
    return "\n".join(["| argument | meaning |", "|---|---|", *rows])


def format_help(parser: argparse.ArgumentParser) -> str:
    """``parser.format_help()`` at a fixed width, whatever the terminal running the build."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        return parser.format_help().rstrip()
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def _fence(text: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text}\n{fence}"


def prose_or_text(text: str) -> str:
    """A description or epilog as a paragraph, or as a text block where it is laid out.

    Text with indented or blank-line-separated lines (examples, lists) keeps its layout.
    """
    text = textwrap.dedent(text).strip("\n")
    lines = text.splitlines()
    laid_out = any(line[:1].isspace() or not line.strip() for line in lines)
    return _fence(text) if laid_out else " ".join(line.strip() for line in lines)


def render_reference(parser: argparse.ArgumentParser) -> str:
    """Markdown for ``parser`` and all its subcommands."""
    parts = []
    for names, summary, sub in [((), "", parser), *subcommands(parser)]:
        title = " ".join([parser.prog, *names])
        parts.append(f"{'#' * min(2 + len(names), 6)} `{title}`")
        if summary:
            parts.append(summary[0].upper() + summary[1:] + ("" if summary.endswith(".") else "."))
        for text in (sub.description, sub.epilog):
            if text and text != summary:
                parts.append(prose_or_text(text))
        table = argument_table(sub)
        if table:
            parts.append(table)
        parts.append('??? example "Full `--help` text"\n\n' + _indent(_fence(format_help(sub))))
    return "\n\n".join(parts)


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" if line else "" for line in text.splitlines())


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    """Replace the marker on the CLI page."""
    if page.file.src_uri != PAGE or MARKER not in markdown:
        return markdown
    from moeblocks.cli.parser import build_parser

    return markdown.replace(MARKER, render_reference(build_parser()))
