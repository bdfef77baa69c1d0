"""MkDocs hook: show ``CHANGELOG.md`` (the repository's, the one the wheel ships) on the site.

The page ``changelog.md`` holds the marker ``<!-- changelog -->``; at build time it is
replaced by ``CHANGELOG.md`` without its title line, so the file stays the one place the
changes are written down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKER = "<!-- changelog -->"
PAGE = "changelog.md"


def changelog_body(text: str) -> str:
    """``CHANGELOG.md`` minus its ``# Changelog`` title (the page has its own)."""
    lines = text.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip()


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    """Replace the marker on the changelog page."""
    if page.file.src_uri != PAGE or MARKER not in markdown:
        return markdown
    root = Path(config.config_file_path).resolve().parent
    text = (root / "CHANGELOG.md").read_text(encoding="utf-8")
    return markdown.replace(MARKER, changelog_body(text))
