"""Nothing at the checkout root shadows an installed distribution.

Python started in the checkout root (``python -m pytest``, ``python -c``) puts the root first
on ``sys.path``, so a regular package or a module there wins over any installed package of
the same import name. transformers ≥ 5.25 imports Hugging Face's ``kernels`` distribution
when a model module loads; a top-level ``kernels/__init__.py`` here broke every
transformers import started from the root. The kernels therefore sit in ``kernels/src/``
(mapped to ``moeblocks.kernels``), and these tests hold the root clean.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = "moeblocks"
# Names that distributions on the package index own, whether or not this environment has
# them installed: a folder with these names must never be a regular package at the root.
KNOWN_ON_INDEX = frozenset({"kernels", "docs", "tests", "benchmarks"})


def importable_root_names(root: Path) -> set[str]:
    """Top-level import names that Python started in ``root`` finds there first."""
    names = {p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    names |= {p.stem for p in root.glob("*.py") if p.is_file()}
    return names


def shadowed(root: Path, taken: set[str]) -> set[str]:
    """The importable names of ``root`` that another distribution or the index owns."""
    return (importable_root_names(root) - {OWN}) & (taken | KNOWN_ON_INDEX)


def installed_import_names() -> set[str]:
    """Import names of every installed distribution but this project's own."""
    return {
        name
        for name, dists in importlib.metadata.packages_distributions().items()
        if any(d.lower() != OWN for d in dists)
    }


def test_the_check_flags_a_shadowing_folder(tmp_path: Path) -> None:
    # The check must be able to fail: a root holding kernels/__init__.py and a json.py.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "json.py").write_text("")
    (tmp_path / "nothing_here").mkdir()
    assert shadowed(tmp_path, {"json"}) == {"kernels", "json"}


def test_no_root_name_shadows_an_installed_distribution() -> None:
    names = importable_root_names(ROOT)
    assert OWN in names, "the check looks at the wrong folder"
    clash = shadowed(ROOT, installed_import_names())
    assert not clash, f"these names at the checkout root shadow installed packages: {clash}"


def test_the_kernels_folder_is_not_a_package() -> None:
    assert (ROOT / "kernels" / "src" / "__init__.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers is not installed"
)
def test_transformers_imports_from_the_checkout_root() -> None:
    script = (
        "import torch, transformers.integrations.hub_kernels\n"
        "from transformers import MixtralConfig, MixtralForCausalLM\n"
        "cfg = MixtralConfig(vocab_size=32, hidden_size=8, intermediate_size=16,\n"
        "    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,\n"
        "    num_local_experts=4, num_experts_per_tok=2)\n"
        "torch.manual_seed(0)\n"
        "logits = MixtralForCausalLM(cfg)(torch.randint(0, 32, (2, 5))).logits\n"
        "assert logits.shape == (2, 5, 32) and torch.isfinite(logits).all()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    # `python -c` in the root: the root is sys.path[0], as for `python -m pytest`.
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("ok")
