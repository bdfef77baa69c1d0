"""The largest error each family test measures, kept for the docs.

The family tests (``test_hf_convert.py``, ``test_hf_families.py``) call :func:`record`
with every relative error they assert on. With ``MOEBLOCKS_RECORD_HF_ERRORS=1`` in the
environment, :func:`write` merges the largest error per family and dtype into
``tests/hf_family_errors.json``, which the docs hook ``docs/_hooks/hf_families.py``
renders into the family tables (so the published numbers are measured, not typed).
``test_hf_families.py`` checks that the file covers every converted family.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

PATH = Path(__file__).resolve().parent / "hf_family_errors.json"
_MEASURED: dict[str, dict[str, float]] = {}


def record(family: str, dtype: torch.dtype, err: float) -> None:
    """Keep ``err`` if it is the largest seen for (family, dtype) in this run."""
    key = {torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    row = _MEASURED.setdefault(family, {})
    row[key] = max(row.get(key, 0.0), float(err))


def load() -> dict[str, dict[str, float]]:
    """The recorded errors (family -> {"fp32": err, "fp64": err})."""
    return json.loads(PATH.read_text(encoding="utf-8")) if PATH.exists() else {}


def write() -> None:
    """Merge this run's errors into the file, when the environment asks for it."""
    if os.environ.get("MOEBLOCKS_RECORD_HF_ERRORS") != "1" or not _MEASURED:
        return
    data = load()
    for family, row in _MEASURED.items():
        data[family] = {**data.get(family, {}), **row}
    text = json.dumps(dict(sorted(data.items())), indent=1, sort_keys=True)
    PATH.write_text(text + "\n", encoding="utf-8")
