"""The condition contrast of the overlap probe: same vs different sense, similar vs not."""

from __future__ import annotations

import json
import re

import pytest
import torch

import moeblocks as mb
from moeblocks import inspect as mi


def test_condition_test_planted_effect_and_null() -> None:
    g = torch.Generator().manual_seed(0)
    labels = ["same"] * 12 + ["diff"] * 12 + ["other"] * 3
    # Planted: "same" pairs overlap ~0.8, "diff" pairs ~0.2 ("other" is ignored).
    overlaps = torch.cat(
        [0.8 + 0.1 * torch.rand(12, generator=g), 0.2 * torch.rand(12, generator=g)]
    )
    overlaps = torch.cat([overlaps, torch.ones(3)])
    res = mi.condition_permutation_test(overlaps, labels, "same", "diff", num_permutations=999)
    assert (res.num_first, res.num_second) == (12, 12)
    assert res.mean_first > 0.8
    assert res.mean_second < 0.2
    assert res.p_value <= 0.002
    # The reverse question has no support.
    assert mi.condition_permutation_test(overlaps, labels, "diff", "same").p_value > 0.99
    # No effect: every pair drawn from the same distribution.
    ps = []
    for seed in range(20):
        gs = torch.Generator().manual_seed(100 + seed)
        null = torch.rand(27, generator=gs)
        ps.append(mi.condition_permutation_test(null, labels, "same", "diff", 199, seed).p_value)
    assert min(ps) > 0.001
    assert sum(p < 0.05 for p in ps) <= 4
    assert sum(ps) / len(ps) > 0.3


def test_condition_test_errors() -> None:
    with pytest.raises(ValueError, match="labels"):
        mi.condition_permutation_test(torch.ones(3), ["a", "b"], "a", "b")
    with pytest.raises(ValueError, match="both conditions"):
        mi.condition_permutation_test(torch.ones(3), ["a", "a", "c"], "a", "b")


def test_loader_reads_target_b_and_condition(tmp_path) -> None:
    path = tmp_path / "swap.jsonl"
    row = {"target": "cat", "context_a": "a cat ran", "context_b": "a fox ran"}
    path.write_text(json.dumps({**row, "target_b": "fox", "condition": "similar"}))
    (item,) = mi.load_probes(path)
    assert (item.word_b, item.condition) == ("fox", "similar")
    path.write_text(json.dumps(row))  # without target_b, context B must hold "cat"
    with pytest.raises(ValueError, match="lacks target 'cat'"):
        mi.load_probes(path)


def test_builtin_contrast_sets_are_balanced_and_well_formed() -> None:
    for name, first, second in [
        ("english-senses", "same-sense", "different-sense"),
        ("synthetic-swap", "similar", "dissimilar"),
    ]:
        items = mi.BUILTIN_PROBES[name]
        conditions = [it.condition for it in items]
        assert conditions.count(first) == conditions.count(second) >= 6
        for it in items:  # each word occurs as a whole word, as locate_word needs
            assert re.search(rf"(?<!\w){re.escape(it.target)}(?!\w)", it.context_a)
            assert re.search(rf"(?<!\w){re.escape(it.word_b)}(?!\w)", it.context_b)


def test_run_condition_probe_on_a_context_free_model() -> None:
    # Routing depends on the token id only, so a swap to the same word would overlap 1
    # and a swap to another word overlaps by chance: "similar" here means identical.
    torch.manual_seed(0)
    E, D = 16, 16
    emb = torch.nn.Embedding(100, D)
    layer = mb.MoELayer(
        mb.Router(mb.CosineScorer(D, E), 2), mb.TorchDispatcher(), mb.SwiGLUExperts(E, D, 8)
    )
    vocab: dict[str, int] = {}

    def encode(text: str) -> list[int]:
        return [vocab.setdefault(w, len(vocab)) for w in text.split()]

    def forward(ids_BS):
        return [layer(emb(ids_BS)).routing]

    items = [
        mi.ProbeItem(w, f"now , a {w} ran", f"now , a {w} ran", condition="same")
        for w in ("cat", "dog", "fox", "owl", "cow", "yak", "elk", "ram")
    ] + [
        mi.ProbeItem(w, f"now , a {w} ran", f"now , a {v} ran", target_b=v, condition="swap")
        for w, v in zip(
            ("cat", "dog", "fox", "owl", "cow", "yak", "elk", "ram"),
            ("one", "two", "red", "sat", "saw", "big", "old", "new"),
            strict=True,
        )
    ]
    with torch.no_grad():
        (res,) = mi.run_condition_probe(forward, encode, items, "same", "swap", 499)
    assert res.mean_first == 1.0
    assert res.mean_second < 1.0
    assert res.p_value < 0.05
