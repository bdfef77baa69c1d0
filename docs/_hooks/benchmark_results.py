"""MkDocs hook: put the measured tables of ``benchmarks/results/*.md`` into the Benchmarks page.

The page holds the marker ``<!-- benchmark-results -->``; at build time it is replaced by
every results file, in name order, with its headings moved one level down and its source
named. With no results yet the marker becomes a sentence saying so. The files are read
as they are on disk, so a new measurement shows up without editing the page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MARKER = "<!-- benchmark-results -->"
PAGE = "benchmarks.md"
_FENCE_RE = re.compile(r"^\s*(`{3,}|~{3,})")


def demote_headings(text: str) -> str:
    """Add one ``#`` to every ATX heading outside fenced code blocks."""
    out, fence = [], None
    for line in text.splitlines():
        m = _FENCE_RE.match(line)
        if m and (fence is None or (m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence))):
            fence = m.group(1) if fence is None else None
        elif fence is None and re.match(r"#{1,5} ", line):
            line = "#" + line
        out.append(line)
    return "\n".join(out)


def render_results(results_dir: Path, repo_root: Path) -> str:
    """Markdown for every results file under ``results_dir`` (or a note that there is none)."""
    files = sorted(results_dir.glob("*.md")) if results_dir.is_dir() else []
    if not files:
        return (
            "*No measured results are in `benchmarks/results/` yet: run the scripts above "
            "to produce them.*"
        )
    parts = []
    for path in files:
        body = demote_headings(path.read_text(encoding="utf-8").strip())
        if not body.lstrip().startswith("#"):
            body = f"## {path.stem}\n\n{body}"
        rel = path.relative_to(repo_root).as_posix()
        parts.append(f"{body}\n\n*Source: `{rel}`.*")
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    """Replace the marker on the Benchmarks page."""
    if page.file.src_uri != PAGE or MARKER not in markdown:
        return markdown
    root = Path(config.config_file_path).resolve().parent
    return markdown.replace(MARKER, render_results(root / "benchmarks" / "results", root))
