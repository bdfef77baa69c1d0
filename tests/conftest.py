"""Test configuration: runtime shape checking and hypothesis profiles.

Every moeblocks module except the Triton kernels is imported through jaxtyping's import
hook, so each annotated function and record checks tensor shapes and dtypes with
beartype at run time. The kernels are left out because ``triton.jit`` reads the source
of the functions it decorates.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from jaxtyping import install_import_hook

_ROOT = Path(__file__).resolve().parent.parent
_HOOKED = sorted(
    "moeblocks." + ".".join(p.relative_to(_ROOT / "moeblocks").with_suffix("").parts)
    for p in (_ROOT / "moeblocks").rglob("*.py")
    if p.name != "__init__.py"
)
_HOOKED = [m.removesuffix(".__init__") for m in _HOOKED]
assert "moeblocks" not in sys.modules, "moeblocks was imported before the jaxtyping hook"
try:
    import beartype  # noqa: F401
except ImportError:  # e.g. a GPU machine with a fixed environment: test without the checks
    _SHAPE_NOTE = "beartype is not installed: runtime shape checking is OFF for this run"
    print(f"NOTE: {_SHAPE_NOTE}", file=sys.stderr)
else:
    _SHAPE_NOTE = "runtime shape checking: jaxtyping + beartype"
    install_import_hook(_HOOKED, "beartype.beartype")


def pytest_report_header(config: pytest.Config) -> str:
    """Say in the header whether shapes are checked at run time."""
    return _SHAPE_NOTE


# CI must never fail by chance: its profile is deterministic. "thorough" explores with
# random seeds; each failure it finds becomes an explicit @example.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread, then restore the thread count.

    Tiny models gain nothing from intra-op threads, and on a busy 2-core CI machine
    oversubscribed OpenMP threads make each step many times slower. Module scope, so a
    module's training runs share one thread count: their results are bitwise equal only
    then (the resume-equivalence tests compare weights exactly).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
