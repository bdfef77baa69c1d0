"""Griffe extension: render the reST-isms of our docstrings as Markdown.

The docstrings are Google style but keep three reST habits that read well in ``help()``
and would otherwise reach the site garbled. Before mkdocstrings renders a docstring:

- a Sphinx role (:class:`~moeblocks.routing.Routing`, :meth:`permute`) becomes an
  *optional* autorefs link: a link where the target is rendered somewhere in the API
  reference, plain code where it is not (a private helper, another library), and never
  a build warning;
- a literal block introduced by ``::`` becomes a fenced block (``pycon`` when it is a
  doctest, ``text`` otherwise) and the ``::`` a single colon;
- a bare doctest (lines starting with ``>>>``, then their output) becomes a fenced
  ``pycon`` block, instead of nested block quotes.

Relative targets resolve the way Sphinx resolves them: from the object outwards through
its parents (``:meth:`permute``` inside a class is that class's method), and a leading
dot starts from the enclosing package (``:mod:`.reference```).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_FENCE_RE = re.compile(r"^\s*(?P<fence>`{3,}|~{3,})")
_ROLE_RE = re.compile(
    r":(?:py:)?(?P<role>class|func|meth|attr|mod|data|exc|obj|const|type):"
    r"`(?P<body>[^`]+)`"
)


def _lookup(collection: Any, path: str) -> str | None:
    """The canonical path of the object at ``path``, or None if griffe does not know it."""
    try:
        obj = collection.get_member(path)
    except Exception:  # any failure means "not resolvable"
        return None
    if obj is None:
        return None
    if getattr(obj, "is_alias", False):
        try:
            return obj.final_target.path
        except Exception:  # an alias to something outside the package
            return None
    return obj.path


def _candidates(obj: Any, target: str) -> list[str]:
    if target.startswith("."):
        module = obj if getattr(obj, "is_module", False) else obj.module
        package = module if module.is_init_module else module.parent
        stripped = target.lstrip(".")
        for _ in range(len(target) - len(stripped) - 1):
            package = package.parent or package
        return [f"{package.path}.{stripped}"]
    scopes, scope = [], obj
    while scope is not None:
        scopes.append(scope.path)
        scope = scope.parent
    return [target, *(f"{s}.{target}" for s in scopes)]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fenced(block: list[str], pad: str, lang: str, before: list[str]) -> list[str]:
    """``block`` as a fence at indentation ``pad``, after the lines ``before`` it."""
    body_indent = min(_indent(line) for line in block if line.strip())
    body = [f"{pad}{line[body_indent:]}" if line.strip() else "" for line in block]
    # A blank line separates the fence from a paragraph at its own level; none after a
    # section title ("Example:"), whose content must follow it directly.
    prev = before[-1] if before else ""
    gap = [""] if prev.strip() and _indent(prev) >= len(pad) else []
    return [*gap, f"{pad}```{lang}", *body, f"{pad}```", ""]


def rest_blocks_to_markdown(text: str) -> str:
    """Turn ``::`` literal blocks and bare doctests into fenced code blocks."""
    lines, out, i, fence = text.splitlines(), [], 0, None
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        marker = _FENCE_RE.match(line)
        if marker:  # an existing Markdown fence: copy it untouched
            char = marker["fence"][0]
            fence = char if fence is None else (None if fence == char else fence)
        if fence is not None or marker:
            out.append(line)
            i += 1
            continue
        rstripped = line.rstrip()
        if rstripped.endswith("::") and not rstripped.endswith(":::"):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and _indent(lines[j]) > _indent(line):
                k, block_indent = j, _indent(lines[j])
                while k < len(lines) and (
                    not lines[k].strip() or _indent(lines[k]) >= block_indent
                ):
                    k += 1
                block = lines[j:k]
                while block and not block[-1].strip():
                    block.pop()
                head = rstripped[:-1]  # "text::" -> "text:"; a bare "::" line goes
                if head.strip() != ":":
                    out.append(head)
                lang = "pycon" if block[0].lstrip().startswith(">>>") else "text"
                out += _fenced(block, " " * _indent(line), lang, out)
                i = k
                continue
        if stripped.startswith(">>>"):
            k = i
            while k < len(lines) and lines[k].strip():
                k += 1
            out += _fenced(lines[i:k], " " * _indent(line), "pycon", out)
            i = k
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _rewrite(obj: Any, collection: Any, text: str) -> str:
    text = rest_blocks_to_markdown(text)

    def replace(match: re.Match[str]) -> str:
        body = match["body"].strip()
        explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
        target = explicit["target"] if explicit else body
        short = target.startswith("~")
        target = target.lstrip("~").removesuffix("()")
        if explicit:
            title = explicit["title"]
        else:
            title = target.lstrip(".").rsplit(".", 1)[-1] if short else target.lstrip(".")
            if match["role"] in ("func", "meth"):
                title += "()"
        code = f"<code>{html.escape(title)}</code>"
        for candidate in _candidates(obj, target):
            path = _lookup(collection, candidate)
            if path is not None:
                return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'
        return code

    # Roles are rewritten in prose only, never inside code blocks.
    out, fence = [], None
    for line in text.splitlines():
        marker = _FENCE_RE.match(line)
        if marker:
            char = marker["fence"][0]
            fence = char if fence is None else (None if fence == char else fence)
        out.append(line if fence is not None or marker else _ROLE_RE.sub(replace, line))
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of a loaded package."""

    def __init__(self) -> None:
        super().__init__()
        self._done: set[str] = set()

    def _walk(self, obj: Any, collection: Any, seen: set[str]) -> None:
        if getattr(obj, "is_alias", False) or obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj, collection, obj.docstring.value)
        for member in obj.members.values():
            self._walk(member, collection, seen)

    def _package_loaded(self, pkg: Any, loader: Any = None) -> None:
        if pkg.path in self._done:
            return
        self._done.add(pkg.path)
        collection = loader.modules_collection if loader is not None else pkg
        self._walk(pkg, collection, set())

    # griffe >= 2 calls on_package; griffe 1.x called on_package_loaded.
    def on_package(self, *, pkg: Any, loader: Any = None, **kwargs: Any) -> None:
        """Rewrite the package once it is fully loaded."""
        self._package_loaded(pkg, loader)

    def on_package_loaded(self, *, pkg: Any, loader: Any = None, **kwargs: Any) -> None:
        """Rewrite the package once it is fully loaded (griffe 1.x)."""
        self._package_loaded(pkg, loader)
