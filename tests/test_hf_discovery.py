"""Every routed MoE block class of the installed transformers is converted or refused.

The test reads the source of ``transformers/models/*/modeling_*.py`` (with ``ast``, not
by importing it: a model whose optional dependencies are missing is still found, and
reading takes well under a second where importing every module takes minutes) and finds
the classes that hold routed experts: an ``__init__`` that assigns ``self.experts``
(sparse-MoE blocks, decoder layers with an inline MoE), or a router (``self.router`` /
``self.router_gate``) next to an expert count, a top-k or an ``...Experts`` child
(JetMoE, Doge). Each must be a row of :data:`moeblocks.hf.FAMILIES` or of
:data:`moeblocks.hf.REFUSED` (with its reason), so a transformers release that adds a
family fails here until it is handled, and a row whose class is gone fails too.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest
import transformers

from moeblocks.hf import FAMILIES, REFUSED, SUPPORTED

MODELS = Path(transformers.__file__).resolve().parent / "models"
_TOP = re.compile(r"^(?=class |def |@|[A-Za-z_])", re.M)  # top-level statements
_HINT = re.compile(r"self\.(experts|router|router_gate)\s*[:=]")


def _assigned(init: ast.FunctionDef) -> tuple[set[str], set[str]]:
    """(attributes ``self.x`` assigned in ``__init__``, names of the classes called there)."""
    attrs, calls = set(), set()
    for node in ast.walk(init):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                is_self = isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                if is_self and t.value.id == "self":
                    attrs.add(t.attr)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            calls.add(node.func.id)
    return attrs, calls


def _is_moe(cls: ast.ClassDef) -> bool:
    init = next(
        (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None
    )
    if init is None:
        return False
    attrs, calls = _assigned(init)
    if "experts" in attrs:
        return True
    routed = attrs & {"num_experts", "top_k"} or any("Experts" in c for c in calls)
    return bool(attrs & {"router", "router_gate"} and routed)


def discover(models: Path = MODELS) -> dict[str, str]:
    """Block class name -> model folder, for every routed MoE class under ``models``."""
    found = {}
    for path in sorted(models.glob("*/modeling_*.py")):
        src = path.read_text(encoding="utf-8")
        if not _HINT.search(src):
            continue
        starts = [m.start() for m in _TOP.finditer(src)] + [len(src)]
        # Parse each top-level class on its own: only those that mention a router/experts.
        for a, b in itertools.pairwise(starts):
            seg = src[a:b]
            if seg.startswith("class ") and _HINT.search(seg):
                cls = ast.parse(seg).body[0]
                if isinstance(cls, ast.ClassDef) and _is_moe(cls):
                    found[cls.name] = path.parent.name
    return found


@pytest.fixture(scope="module")
def found() -> dict[str, str]:
    return discover()


def test_every_moe_block_is_converted_or_refused(found: dict[str, str]) -> None:
    refused = {r.block_class for r in REFUSED}
    missing = sorted(
        f"{folder}: {cls}" for cls, folder in found.items() if cls not in {*SUPPORTED, *refused}
    )
    assert not missing, (
        f"transformers {transformers.__version__} has routed MoE blocks that are neither "
        f"a row of moeblocks.hf.FAMILIES nor of REFUSED: {missing}"
    )


def test_every_row_names_a_class_that_exists(found: dict[str, str]) -> None:
    rows = [*SUPPORTED, *(r.block_class for r in REFUSED)]
    assert len(rows) == len(set(rows)), "a block class is listed twice"
    stale = sorted(set(rows) - set(found))
    assert not stale, f"rows for classes transformers {transformers.__version__} lacks: {stale}"


def test_refusals_say_why() -> None:
    for r in REFUSED:
        assert r.reason.strip(), r.block_class
        assert r.family.strip(), r.block_class


def test_discovery_finds_the_known_shapes(found: dict[str, str]) -> None:
    # One of each shape the scanner must recognise: a sparse-MoE block, a decoder layer
    # with an inline MoE, a router with expert banks but no `experts` attribute, and
    # a product-key MoE.
    assert found["MixtralSparseMoeBlock"] == "mixtral"
    assert found["Gemma4TextDecoderLayer"] == "gemma4"
    assert found["JetMoeMoE"] == "jetmoe"
    assert found["DogeCDMoE"] == "doge"
    folders = set(found.values())
    print(
        f"\n{len(found)} routed MoE classes in {len(folders)} model folders; "
        f"{len(FAMILIES)} converted, {len(REFUSED)} refused"
    )
