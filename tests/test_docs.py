"""Every ```python block in the docs and the README runs.

The blocks of one page run in order in one namespace (so a page can build on its earlier
blocks), in a temporary working directory, with a fixed torch seed. A block that cannot
run here (GPU-only, long training) is fenced as something else (```bash, ```text), or,
sparingly, preceded by the line ``<!-- skip-test -->``.

Also checks that the API reference covers every public name of ``moeblocks``.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
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


def _load_hook():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "benchmark_results", DOCS / "_hooks" / "benchmark_results.py"
    )
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
