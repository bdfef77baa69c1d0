"""MkDocs hook: the Hugging Face family tables, generated from the library and the tests.

The pages ``hf.md`` and ``architectures.md`` hold the markers ``<!-- hf-families -->``
and ``<!-- hf-refused -->``. At build time the first becomes one row per converted block
class of :data:`moeblocks.hf.FAMILIES` (its composition and the largest relative error
the tests measured against Hugging Face's block, read from
``tests/hf_family_errors.json``, which ``MOEBLOCKS_RECORD_HF_ERRORS=1`` makes the family
tests write); the second one row per refused class of :data:`moeblocks.hf.REFUSED` with
its reason. A row whose Hugging Face block is wrong (``Family.hf_block_is_wrong``) is
marked, its error is measured against the published routing, and a note under the table
says what is wrong. Nothing in these tables is typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES_MARKER = "<!-- hf-families -->"
REFUSED_MARKER = "<!-- hf-refused -->"
PAGES = ("hf.md", "architectures.md")
ERRORS = Path("tests") / "hf_family_errors.json"
_RETURNS = {
    "tensor": "output",
    "tensor_and_weights": "output, combine weights `[T, K]`",
    "flat_and_logits": "output `[T, D]`, router logits `[T, E]`",
    "flat_and_flat_logits": "output `[T·D]`, router logits `[T·E]`",
    "tensor_and_key_logits": "output, key logits `[2, T, n]`",
}


def _err(row: dict[str, float], key: str) -> str:
    return f"{row[key]:.1e}" if key in row else "not measured"


def render_families(errors: dict[str, dict[str, float]]) -> str:
    """The converted families as a Markdown table, with the measured errors."""
    from moeblocks.hf.families import FAMILIES

    lines = [
        "| family | HF block class | router | experts | shared experts | block returns "
        "| largest error fp32 / fp64 |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for f in FAMILIES:
        row = errors.get(f.name, {})
        err = f"{_err(row, 'fp32')} / {_err(row, 'fp64')}"
        bank = f.bank.name
        if f.routed_scale is not None:  # ConstantScaledExperts around the bank
            bank += f"; output × `{f.routed_scale}`"
        shared = f.shared.name
        if f.structure.name != "—":  # norms around the parts
            shared = f"{shared}; {f.structure.name}"
        returns = "the MoE part of the decoder layer" if f.inline else _RETURNS[f.returns]
        if f.hf_block_is_wrong:
            err += " (vs the published routing, see below)"
            notes.append(f"- **{f.name}**: HF's block is wrong: {f.hf_block_is_wrong}.")
            if f.no_swap:
                notes.append(f"  `swap_moe_blocks` refuses it: {f.no_swap}.")
        lines.append(
            f"| {f.name} | `{f.block_class}` | {f.router.name} | {bank} "
            f"| {shared} | {returns} | {err} |"
        )
    if notes:
        lines += ["", "Where Hugging Face's block is not the oracle:", "", *notes]
    return "\n".join(lines)


def render_refused() -> str:
    """The refused block classes as a Markdown table, with their reasons."""
    from moeblocks.hf.families import REFUSED

    lines = ["| model folder | HF block class | why it is refused |", "|---|---|---|"]
    for r in sorted(REFUSED, key=lambda r: (r.family, r.block_class)):
        lines.append(f"| {r.family} | `{r.block_class}` | {r.reason} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    """Replace the markers on the two pages."""
    if page.file.src_uri not in PAGES:
        return markdown
    if FAMILIES_MARKER in markdown:
        path = Path(config.config_file_path).resolve().parent / ERRORS
        errors = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        markdown = markdown.replace(FAMILIES_MARKER, render_families(errors))
    if REFUSED_MARKER in markdown:
        markdown = markdown.replace(REFUSED_MARKER, render_refused())
    return markdown
