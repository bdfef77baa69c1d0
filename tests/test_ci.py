"""CI and the README agree (issue 26): the same commands, a fresh environment, honest bounds.

``.ci/run`` must run exactly the README's test command, inside a virtual environment it
makes anew (without the system's site-packages) and removes; the lowest-direct
constraints must name each lower bound of ``pyproject.toml``; the README and the docs'
home page must name no address that cannot be reached.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI_RUN = ROOT / ".ci" / "run"
LOWEST = ROOT / ".ci" / "lowest-direct.txt"
# Addresses of the project that do not exist (yet): issue 32.
UNREACHABLE = ("github.com/moeblocks", "moeblocks.github.io", "pypi.org/project/moeblocks")


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def _ci_lines() -> list[str]:
    return [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]


def test_ci_runs_the_readme_test_command() -> None:
    commands = _readme_commands()
    (test_command,) = [c for c in commands if "pytest" in c]
    assert test_command.startswith("pip install torch==2.13.0 && pip install -e '.[dev]'")
    assert "mkdocs build --strict" in test_command
    lines = _ci_lines()
    assert lines.count(test_command) == 1, "`.ci/run` must run the README's test command as is"
    assert "pip install torch==2.13.0 && pip install -e '.[sra,plots]' && moeblocks demo" in (
        commands
    )


def test_ci_uses_a_fresh_environment_and_prints_versions_first() -> None:
    lines = [line for line in _ci_lines() if line and not line.startswith("#")]
    text = "\n".join(lines)
    assert "set -euo pipefail" in lines
    tmp = next(i for i, line in enumerate(lines) if line.startswith('tmp="$(mktemp -d'))
    venv = lines.index('python3 -m venv "$tmp/venv"')
    assert tmp < venv
    assert "--system-site-packages" not in text
    assert re.search(r"trap 'rm -rf \"\$tmp\"' EXIT", text), "the environment is removed"
    activate = next(i for i, line in enumerate(lines) if "/venv/bin/activate" in line)
    versions = next(i for i, line in enumerate(lines) if ".ci/versions.py" in line)
    test = next(i for i, line in enumerate(lines) if "pytest" in line)
    assert venv < activate < versions < test
    # A failing `node` first on PATH: the docs build must use the docs extra's Node.js.
    assert any("broken-node:$PATH" in line for line in lines[:test])


def test_versions_script_names_each_distribution() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "versions.py"), "pytest", "moeblocks-no-such-dist"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("python 3.")
    assert lines[1] == f"pytest {pytest.__version__}"
    assert lines[2] == "moeblocks-no-such-dist -"
    default = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "versions.py")],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    names = [line.split()[0] for line in default.splitlines()[1:]]
    for name in ("torch", "triton", "transformers", "kernels", "hypothesis", "jaxtyping",
                 "mkdocs-material"):  # fmt: skip
        assert name in names


def _lower_bounds() -> dict[str, str]:
    """``name: version`` of every ``>=`` bound in pyproject.toml's dependencies and extras."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += extra
    bounds: dict[str, str] = {}
    for text in requirements:
        req = Requirement(text)
        if req.name == "moeblocks":  # the dev extra's own extras
            continue
        lows = [s.version for s in req.specifier if s.operator == ">="]
        assert len(lows) == 1, f"{text}: one lower bound (>=) expected"
        name = canonicalize_name(req.name)
        assert bounds.get(name, lows[0]) == lows[0], f"{name}: two different lower bounds"
        bounds[name] = lows[0]
    return bounds


def test_lowest_direct_constraints_are_the_lower_bounds() -> None:
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = {}
    for line in LOWEST.read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    bounds = _lower_bounds()
    # torch is pinned at the README's version (the one on disk); its bound is the oldest
    # version tested on the GPU machine, so it is not in the lowest-direct run.
    assert pins.pop("torch") == "2.13.0"
    assert set(pins) == set(bounds) - {"torch"}
    for name, low in bounds.items():
        if name != "torch":
            assert Version(pins[name]) == Version(low), f"{name}: pinned {pins[name]}, bound {low}"


def test_no_unreachable_project_address() -> None:
    pages = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "docs").rglob("*.md"))]
    for rel in ("README.md", "pyproject.toml", "mkdocs.yml", "CHANGELOG.md", *pages):
        text = (ROOT / rel).read_text(encoding="utf-8")
        for address in UNREACHABLE:
            assert address not in text, f"{rel} names {address}, which cannot be reached"
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "to be published" in readme
    assert "Node.js, which must be on `PATH`" not in readme
