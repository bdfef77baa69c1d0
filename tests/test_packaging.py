"""Release packaging: the wheel and sdist that `pip install moeblocks` would get.

The quick tests check the metadata of the installed checkout (one version everywhere,
the package list, the extras). The slow test builds an sdist and, from it, a wheel out
of a copy of the checkout, installs the wheel into a fresh virtual environment and runs
it from a folder outside the checkout.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import moeblocks
from moeblocks import _optional
from moeblocks._optional import require

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _package_of(folder: Path, root: Path = ROOT) -> str:
    """The import name that pyproject's package-dir mapping gives a source folder."""
    for name, where in sorted(SETUPTOOLS["package-dir"].items(), key=lambda kv: -len(kv[1])):
        base = root / where
        if folder == base or base in folder.parents:
            return ".".join([name, *folder.relative_to(base).parts])
    raise AssertionError(f"{folder} is outside every package-dir of pyproject.toml")


def _source_packages() -> set[str]:
    """Every folder under a mapped package root that holds Python files, as a package."""
    found = set()
    for where in SETUPTOOLS["package-dir"].values():
        for py in (ROOT / where).rglob("*.py"):
            if "__pycache__" not in py.parts:
                found.add(_package_of(py.parent))
    return found


# --- one version -------------------------------------------------------------------------


def test_one_version_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    from moeblocks import cli

    assert importlib.metadata.version("moeblocks") == moeblocks.__version__, (
        "installed metadata is stale: reinstall with pip install -e '.[dev]'"
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moeblocks {moeblocks.__version__}"


def test_changelog_has_an_entry_for_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{moeblocks.__version__}]" in changelog


# --- package list and metadata --------------------------------------------------------------


def test_package_list_matches_the_source_folders() -> None:
    # The list in pyproject.toml is explicit (kernels/ is mapped from outside moeblocks/),
    # so a new subpackage such as moeblocks/inspect/ must be added to it by hand.
    listed = set(SETUPTOOLS["packages"])
    assert listed == _source_packages(), "update [tool.setuptools] packages in pyproject.toml"
    assert all(p == "moeblocks" or p.startswith("moeblocks.") for p in listed)


def test_metadata() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert project["scripts"] == {"moeblocks": "moeblocks.cli:main"}
    # Until the repository, the site and the release are public, metadata names no URL
    # (issue 32: an address that cannot be reached is a promise that does not hold).
    assert "urls" not in project
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "moeblocks._version.__version__"
    }
    for requirement in project["dependencies"]:
        assert any(op in requirement for op in (">=", "~=", "<")), f"{requirement} is unpinned"


def test_optional_extras_match_pyproject() -> None:
    assert set(PYPROJECT["project"]["optional-dependencies"]) == _optional.EXTRAS


# --- optional imports ------------------------------------------------------------------------


def test_require_returns_an_installed_module() -> None:
    assert require("json", extra="sra", feature="reading configs") is json


@pytest.mark.parametrize("name", ["moeblocks_no_such_module", "moeblocks_no_such_module.sub"])
def test_require_names_the_extra_to_install(name: str) -> None:
    with pytest.raises(ImportError, match=r"pip install 'moeblocks\[plots\]'") as info:
        require(name, extra="plots", feature="plotting utilisation")
    assert "plotting utilisation" in str(info.value)
    assert info.value.name == name
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_require_keeps_a_broken_install_error(tmp_path: Path, monkeypatch) -> None:
    # An installed module that imports a missing one is a broken install, not a missing
    # extra: the original error comes through unchanged.
    (tmp_path / "moeblocks_fake_plotting.py").write_text("import moeblocks_fake_missing_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("moeblocks_fake_plotting", extra="plots", feature="plots")
    assert info.value.name == "moeblocks_fake_missing_dep"
    assert "pip install" not in str(info.value)


def test_require_rejects_an_unknown_extra() -> None:
    with pytest.raises(ValueError, match="extra must be one of"):
        require("json", extra="plot", feature="plots")


# --- the built wheel, installed in a clean environment -------------------------------------


_IGNORED = ("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".git", ".venv", "runs",
            "site", ".hypothesis", ".pytest_cache", ".ruff_cache")  # fmt: skip


def _copy_checkout(dest: Path) -> None:
    """Copy the files git would ship (tracked or new, not ignored) to ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
    )
    if listed.returncode != 0:  # not a git checkout: fall back to the ignore list
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*_IGNORED))
        return
    for rel in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():  # skip files deleted in the work tree
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _can_build_without_isolation() -> bool:
    """Whether the running environment has the build backend pyproject.toml asks for."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    from packaging.requirements import Requirement

    return all(
        importlib.util.find_spec(req.name) is not None
        and importlib.metadata.version(req.name) in req.specifier
        for req in map(Requirement, PYPROJECT["build-system"]["requires"])
    )


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_clean_venv(tmp_path: Path) -> None:
    version = moeblocks.__version__
    src, dist, venv, outside = (tmp_path / n for n in ("src", "dist", "venv", "outside"))
    _copy_checkout(src)
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

    # sdist first, then the wheel built from the unpacked sdist, so a file missing from
    # the sdist shows up as a broken wheel. Without isolation when the backend is already
    # installed (the dev extra brings it): no download, and seconds instead of a minute.
    build = [sys.executable, "-m", "build", "--outdir", str(dist), str(src)]
    if _can_build_without_isolation():
        build.append("--no-isolation")
    _run(build, env=env, cwd=outside)
    (wheel,) = dist.glob("moeblocks-*.whl")
    (sdist,) = dist.glob("moeblocks-*.tar.gz")
    assert wheel.name == f"moeblocks-{version}-py3-none-any.whl"
    _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)], env=env)

    # The wheel holds the moeblocks package and its metadata, nothing else at top level.
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        metadata = whl.read(f"moeblocks-{version}.dist-info/METADATA").decode()
        entry_points = whl.read(f"moeblocks-{version}.dist-info/entry_points.txt").decode()
    info = f"moeblocks-{version}.dist-info"
    assert {n.split("/")[0] for n in names} == {"moeblocks", info}
    assert "moeblocks/py.typed" in names
    assert "moeblocks/kernels/__init__.py" in names
    shipped = {n for n in names if n.endswith(".py")}
    expected = {
        "/".join([*_package_of(p.parent, root=src).split("."), p.name])
        for where in SETUPTOOLS["package-dir"].values()
        for p in (src / where).rglob("*.py")
    }
    assert shipped == expected
    assert f"Version: {version}" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    assert f"{info}/licenses/LICENSE" in names
    assert "moeblocks = moeblocks.cli:main" in entry_points
    with tarfile.open(sdist) as tar:
        sdist_names = {n.split("/", 1)[-1] for n in tar.getnames()}
    assert {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml"} <= sdist_names
    assert {"kernels/src/__init__.py", "tests/conftest.py"} <= sdist_names

    # A fresh venv that sees this interpreter's packages (torch & co.) behind its own
    # site-packages. --system-site-packages alone reaches the base interpreter's, which
    # is not this one when the tests run inside a venv, so add this one's site dirs too.
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)])
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    venv_site = Path(_run([str(py), "-c", purelib]).stdout.strip())
    outer = [*site.getsitepackages(), site.getusersitepackages()]
    (venv_site / "_outer_site.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in outer if Path(d).is_dir())
    )
    # pip comes from the outer site-packages; --ignore-installed leaves the checkout's
    # editable install alone and puts the wheel in the venv, in front of it on sys.path.
    _run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
         "--disable-pip-version-check", str(wheel)],
        env=env, cwd=outside,
    )  # fmt: skip

    probe = (
        "import importlib.metadata, json, moeblocks, moeblocks.kernels, moeblocks.sra\n"
        "print(json.dumps({'file': moeblocks.__file__, 'kernels': moeblocks.kernels.__file__,"
        " 'version': moeblocks.__version__,"
        " 'metadata': importlib.metadata.version('moeblocks')}))"
    )
    seen = json.loads(_run([str(py), "-c", probe], env=env, cwd=outside).stdout)
    for key in ("file", "kernels"):
        assert Path(seen[key]).resolve().is_relative_to(venv.resolve()), seen
    assert seen["version"] == seen["metadata"] == version

    script = venv / ("Scripts/moeblocks.exe" if os.name == "nt" else "bin/moeblocks")
    out = _run([str(script), "--version"], env=env, cwd=outside).stdout
    assert out.strip() == f"moeblocks {version}"
    assert "usage:" in _run([str(script), "demo", "--help"], env=env, cwd=outside).stdout
