"""Optional dependencies: import them where a feature needs them, or say how to install them.

``import moeblocks`` needs torch, einops, jaxtyping and numpy only. Everything else
(tokenizers, safetensors and tqdm for the SRA trainer, matplotlib for plots, Triton for
the GPU kernels, transformers for the Hugging Face bridge) is imported inside the function
that needs it, through :func:`require`, so a missing package fails with the
``pip install`` command that provides it::

    plt = require("matplotlib.pyplot", extra="plots", feature="moeblocks inspect --plot")
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "require"]

#: The optional-dependency groups of pyproject.toml (a test keeps the two in step).
EXTRAS = frozenset({"dev", "docs", "hf", "plots", "sra", "triton"})


def require(module_name: str, extra: str, feature: str) -> ModuleType:
    """Import and return ``module_name``, or raise an error naming the extra to install.

    Args:
        module_name: the dotted module to import, e.g. ``"matplotlib.pyplot"``.
        extra: the moeblocks extra that installs it, one of :data:`EXTRAS`.
        feature: what needs the module, in words, for the message, e.g.
            ``"moeblocks inspect --plot"``.

    Returns:
        The imported module.

    Raises:
        ImportError: ``module_name`` (or a package above it) is not installed; the
            message names ``pip install 'moeblocks[EXTRA]'``. A module that is installed
            but fails while importing something else re-raises that original error.
        ValueError: ``extra`` is not one of :data:`EXTRAS`.
    """
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {sorted(EXTRAS)}, got {extra!r}")
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if not missing or not (module_name == missing or module_name.startswith(missing + ".")):
            raise  # a dependency of an installed module is missing: a broken install
        raise ImportError(
            f"{feature} needs the optional package {missing!r}, which is not installed. "
            f"Install it with: pip install 'moeblocks[{extra}]'",
            name=module_name,
        ) from err
