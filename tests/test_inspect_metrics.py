"""Routing metrics, the overlap probe and anchor traces on hand-built routing records."""

from __future__ import annotations

import json
import math

import pytest
import torch

import moeblocks as mb
from moeblocks import inspect as mi


def record(experts: list[list[int]], probs: list[list[float]] | None = None, E: int = 4):
    """A Routing record with the given choices (probs default: one-hot on the first choice)."""
    ex = torch.tensor(experts, dtype=torch.long)
    if probs is None:
        p = torch.full((len(experts), E), 0.0)
        p[torch.arange(len(experts)), ex[:, 0]] = 1.0
    else:
        p = torch.tensor(probs, dtype=torch.float32)
    scores = p.clamp_min(1e-6).log()
    w = torch.full(ex.shape, 1.0 / ex.shape[1])
    return mb.Routing(scores, p, ex, w)


def test_counts_utilisation_dead():
    r = record([[0, 1], [0, 2], [1, 0]], E=4)
    assert mi.expert_counts(r).tolist() == [3, 2, 1, 0]
    assert mi.expert_counts(r, top1=True).tolist() == [2, 1, 0, 0]
    assert mi.utilisation(r).tolist() == pytest.approx([0.5, 2 / 6, 1 / 6, 0.0])
    assert mi.dead_experts(r).tolist() == [False, False, False, True]
    s = mi.summarise_layer(r)
    assert s.dead == [3]
    assert s.dead_fraction == 0.25
    assert s.max_entropy == pytest.approx(math.log(4))
    u = [0.5, 2 / 6, 1 / 6]
    assert mi.usage_entropy(r) == pytest.approx(-sum(x * math.log(x) for x in u))


def test_saturation_and_entropy():
    uniform = record([[0], [1]], probs=[[0.25] * 4, [0.25] * 4])
    assert mi.router_saturation(uniform) == pytest.approx(0.25)
    assert mi.routing_entropy(uniform) == pytest.approx(math.log(4))
    onehot = record([[2], [3]])
    assert mi.router_saturation(onehot) == pytest.approx(1.0)
    assert mi.routing_entropy(onehot) == pytest.approx(0.0, abs=1e-6)
    mixed = record([[0], [1]], probs=[[0.7, 0.1, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2]])
    assert mi.router_saturation(mixed) == pytest.approx(0.6)


def test_vocabulary_counts_top_tokens_entropy():
    # expert 0 gets tokens 5,5,5 (a specialist); expert 1 gets 1,2 (two tokens); 2, 3 unused
    r = record([[0], [0], [0], [1], [1]])
    ids = torch.tensor([5, 5, 5, 1, 2])
    c = mi.expert_token_counts(r, ids, vocab_size=8)
    assert c.shape == (4, 8)
    assert c[0, 5] == 3
    assert c[1, 1] == 1
    assert c[1, 2] == 1
    assert mi.top_tokens(c, n=2)[0] == [(5, 3)]
    assert sorted(mi.top_tokens(c, n=2)[1]) == [(1, 1), (2, 1)]
    h = mi.vocabulary_entropy(c)
    assert h[0] == pytest.approx(0.0)
    assert h[1] == pytest.approx(math.log(2))
    assert math.isnan(h[2])
    with pytest.raises(ValueError, match="token_ids must have shape"):
        mi.expert_token_counts(r, ids[:3], vocab_size=8)


def test_purity_and_npmi():
    # Perfect specialists: expert 0 <-> class 0, expert 1 <-> class 1.
    r = record([[0], [0], [1], [1], [2]])
    cls = torch.tensor([0, 0, 1, 1, -1])  # last token has no class: left out
    c = mi.class_counts(r, cls, num_classes=2)
    assert c.tolist() == [[2, 0], [0, 2], [0, 0], [0, 0]]
    per, overall = mi.purity(c)
    assert per[:2].tolist() == [1.0, 1.0]
    assert math.isnan(per[2])
    assert overall == 1.0
    n = mi.npmi(c)
    # p(e,c) = 1/2 = p(e) = p(c): pmi = log 2, -log p(e,c) = log 2 -> npmi 1; never together: -1
    assert n[0, 0] == pytest.approx(1.0)
    assert n[1, 1] == pytest.approx(1.0)
    assert n[0, 1] == pytest.approx(-1.0)
    assert math.isnan(n[2, 0])
    # Independence: every expert sees both classes equally -> npmi 0, purity 1/2.
    r2 = record([[0], [0], [1], [1]])
    c2 = mi.class_counts(r2, torch.tensor([0, 1, 0, 1]), num_classes=2)
    assert mi.npmi(c2)[:2].abs().max() == pytest.approx(0.0, abs=1e-6)
    assert mi.purity(c2)[1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="classes must lie"):
        mi.class_counts(r2, torch.tensor([0, 1, 0, 2]), num_classes=2)


def test_topk_jaccard():
    a = torch.tensor([[0, 1], [0, 1], [0, 1]])
    b = torch.tensor([[1, 0], [1, 2], [2, 3]])
    assert mi.topk_jaccard(a, b, 4).tolist() == pytest.approx([1.0, 1 / 3, 0.0])


def test_subtoken_coherence_known_answer():
    # words: [0 0] [1 1 1] [2] -1 ; pairs (0,1), (2,3), (3,4)
    r = record([[0, 1], [0, 1], [2, 3], [2, 0], [1, 3], [3, 2], [1, 0]])
    words = torch.tensor([0, 0, 1, 1, 1, 2, -1])
    c = mi.subtoken_coherence(r, words, num_shuffles=50)
    assert c.num_pairs == 3
    assert c.top1_agreement == pytest.approx(2 / 3)  # (0,0) yes, (2,2) yes, (2,1) no
    assert c.jaccard == pytest.approx((1.0 + 1 / 3 + 0.0) / 3)
    assert 0.0 <= c.baseline_top1 <= 1.0
    assert 0.0 <= c.baseline_jaccard <= 1.0
    none = mi.subtoken_coherence(r, torch.arange(7))
    assert none.num_pairs == 0
    assert math.isnan(none.top1_agreement)


def test_subtoken_coherence_beats_shuffled_baseline():
    g = torch.Generator().manual_seed(0)
    word_expert = torch.randint(0, 16, (300,), generator=g)
    words = torch.arange(300).repeat_interleave(2)  # every word has two pieces
    ex = word_expert.repeat_interleave(2).unsqueeze(1)
    c = mi.subtoken_coherence(record(ex.tolist(), E=16), words)
    assert c.top1_agreement == 1.0
    assert c.baseline_top1 < 0.2


def test_overlap_probe_planted_effect_and_null():
    g = torch.Generator().manual_seed(1)
    n, E, K = 20, 32, 2
    a = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])
    planted = mi.overlap_permutation_test(a, a.flip(1), E, num_permutations=999)
    assert planted.observed == 1.0
    assert planted.p_value <= 0.002
    assert planted.null_mean < 0.3
    # No effect: B is drawn independently of A.
    ps = []
    for seed in range(20):
        gs = torch.Generator().manual_seed(100 + seed)
        b = torch.stack([torch.randperm(E, generator=gs)[:K] for _ in range(n)])
        ps.append(mi.overlap_permutation_test(a, b, E, num_permutations=199, seed=seed).p_value)
    assert min(ps) > 0.001
    assert sum(p < 0.05 for p in ps) <= 4
    assert sum(ps) / len(ps) > 0.3
    with pytest.raises(ValueError, match="same number of rows"):
        mi.overlap_permutation_test(a, a[:3], E)


def test_probe_loader_and_locate(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"target": "cat", "context_a": "the cat sat", "context_b": "a cat ran"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert mi.load_probes(path) == (mi.ProbeItem("cat", "the cat sat", "a cat ran"),)
    path.write_text(json.dumps({"target": "dog", "context_a": "dogs", "context_b": "a dog"}))
    with pytest.raises(ValueError, match="lacks target"):
        mi.load_probes(path)
    vocab = {w: i for i, w in enumerate(["the", "a", "cat", "sat", "concatenate"])}

    def encode(text: str) -> list[int]:
        return [vocab[w] for w in text.split()]

    ids, pos = mi.locate_word(encode, "the a cat sat", "cat")
    assert ids == [0, 1, 2, 3]
    assert pos == [2]
    with pytest.raises(ValueError, match="does not occur"):
        mi.locate_word(encode, "the concatenate", "cat")
    for items in mi.BUILTIN_PROBES.values():
        assert len(items) >= 10
        for it in items:
            assert it.target in it.context_a.split() or it.target in it.context_a


def test_run_overlap_probe_through_a_layer():
    torch.manual_seed(0)
    E, D = 8, 16
    emb = torch.nn.Embedding(100, D)
    layer = mb.MoELayer(
        mb.Router(mb.CosineScorer(D, E), 2), mb.TorchDispatcher(), mb.SwiGLUExperts(E, D, 8)
    )
    vocab: dict[str, int] = {}

    def encode(text: str) -> list[int]:
        return [vocab.setdefault(w, len(vocab)) for w in text.split()]

    def forward(ids_BS):
        return [layer(emb(ids_BS)).routing]  # routing depends on the token only

    items = mi.BUILTIN_PROBES["synthetic"][:8]
    with torch.no_grad():
        (res,) = mi.run_overlap_probe(forward, encode, items, num_permutations=199)
    # A context-free model routes a word identically everywhere: overlap 1.
    assert res.observed == 1.0
    assert res.num_items == 8
    assert res.p_value < 0.05


def test_collect_routing_and_capture():
    torch.manual_seed(0)
    D, E = 8, 4
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, D),
        mb.MoELayer(
            mb.Router(mb.LinearScorer(D, E), 1), mb.TorchDispatcher(), mb.GELUExperts(E, D, 8)
        ),
    )
    batches = [torch.randint(0, 10, (2, 5)) for _ in range(3)]
    with mi.capture_routings(model) as forward:
        rs = mi.collect_routing(forward, batches)
    assert rs.num_layers == 1
    assert rs.num_tokens == 30
    assert rs.seq_len == 5
    assert torch.equal(rs.token_ids, torch.cat([b.reshape(-1) for b in batches]))
    assert rs.layers[0].experts.shape == (30, 1)
    assert not model[1]._forward_hooks  # hooks removed on exit
    with pytest.raises(ValueError, match="batches was empty"):
        mi.collect_routing(forward, [])


def test_anchor_similarity_and_traces():
    torch.manual_seed(0)
    scorer = mb.CosineScorer(16, 4, temperature=5.0)
    sim = mi.anchor_similarity(scorer)
    assert torch.allclose(sim, torch.eye(4), atol=1e-5)  # orthogonal init
    router = mb.Router(scorer, 2)
    assert torch.equal(mi.anchor_similarity(router.anchors), sim)
    assert mi.layer_temperatures(
        mb.MoELayer(router, mb.TorchDispatcher(), mb.GELUExperts(4, 16, 8))
    ) == [5.0]
    x = torch.randn(3, 16)
    r = router(x)
    tr = mi.anchor_traces([r, r], [5.0, None])
    expected = (
        torch.nn.functional.normalize(x, dim=-1)
        @ torch.nn.functional.normalize(scorer.anchors_ED, dim=-1).t()
    )
    torch.testing.assert_close(tr.cosine[0], expected.detach(), rtol=1e-5, atol=1e-5)
    assert tr.is_cosine == (True, False)
    torch.testing.assert_close(tr.cosine[1], r.scores.detach())
    text = mi.format_trace(tr, ["a", "b", "c"], best=2)
    assert len(text.splitlines()) == 3
    assert "L1 [" in text
    layer = mb.MoELayer(router, mb.TorchDispatcher(), mb.GELUExperts(4, 16, 8))
    assert mi.layer_temperatures(torch.nn.Sequential(layer)) == [pytest.approx(5.0)]
