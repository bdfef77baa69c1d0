"""Scorers, the router and k schedules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moeblocks as mb


@given(
    st.integers(0, 40),
    st.integers(1, 16),
    st.integers(1, 33),
    st.integers(1, 8),
    st.integers(0, 99),
)
def test_router_record_invariants(
    tokens: int, dim: int, num_experts: int, k: int, seed: int
) -> None:
    k = min(k, num_experts)
    torch.manual_seed(seed)
    router = mb.Router(mb.CosineScorer(dim, num_experts), schedule=k)
    r = router(torch.randn(tokens, dim))
    assert r.scores.shape == r.probs.shape == (tokens, num_experts)
    assert r.experts.shape == r.weights.shape == (tokens, k)
    assert r.probs.dtype == torch.float32
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(tokens))
    # Cosine scores are bounded by the temperature.
    assert bool((r.scores.abs() <= router.scorer.temperature.abs() + 1e-4).all())
    if k > 1:
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(tokens))
    else:
        torch.testing.assert_close(r.weights, r.probs.max(-1, keepdim=True).values)
    # Distinct experts per token.
    assert all(len(set(row)) == k for row in r.experts.tolist())


def test_k1_still_trains_the_scorer() -> None:
    torch.manual_seed(0)
    router = mb.Router(mb.CosineScorer(8, 4), schedule=1)
    router(torch.randn(5, 8)).weights.sum().backward()
    assert router.scorer.anchors_ED.grad.abs().sum() > 0
    assert router.scorer.temperature.grad.abs() > 0


def test_cosine_scores_formula() -> None:
    scorer = mb.CosineScorer(3, 2, temperature=-2.0)
    with torch.no_grad():
        scorer.anchors_ED.copy_(torch.tensor([[1.0, 0, 0], [0, 3.0, 4.0]]))
    x = torch.tensor([[2.0, 0, 0], [0, 0, 1.0]])
    # |τ| · cos: token 0 matches anchor 0; token 1 has cos 0.8 with anchor 1.
    torch.testing.assert_close(scorer(x), torch.tensor([[2.0, 0.0], [0.0, 1.6]]))


def test_anchor_inits() -> None:
    torch.manual_seed(0)
    orth = mb.CosineScorer(16, 8, init="orthogonal").anchors_ED
    torch.testing.assert_close(orth @ orth.t(), torch.eye(8), atol=1e-5, rtol=0)
    assert mb.CosineScorer(16, 8, init="kaiming").anchors_ED.std() > 0
    with pytest.raises(ValueError, match="init"):
        mb.CosineScorer(16, 8, init="xavier")


def test_batch_init_seeds_anchors_from_the_first_training_batch() -> None:
    torch.manual_seed(0)
    scorer = mb.CosineScorer(8, 4, init="batch")
    tokens = torch.randn(6, 8)
    scorer.eval()
    scorer(tokens)
    assert not bool(scorer.seeded), "eval mode must not seed"
    scorer.train()
    scorer(tokens)
    normed = torch.nn.functional.normalize(tokens, dim=-1)
    for anchor in scorer.anchors_ED.detach():
        assert torch.isclose(normed @ anchor, torch.tensor(1.0), atol=1e-5).any()
    seeded = scorer.anchors_ED.detach().clone()
    scorer(torch.randn(6, 8))
    assert torch.equal(scorer.anchors_ED.detach(), seeded), "anchors must be seeded once"
    restored = mb.CosineScorer(8, 4, init="batch")
    restored.load_state_dict(scorer.state_dict())
    restored.train()
    restored(torch.randn(6, 8))
    assert torch.equal(restored.anchors_ED.detach(), seeded), "a resumed scorer must not re-seed"


def test_noise_only_in_training() -> None:
    torch.manual_seed(0)
    router = mb.Router(mb.LinearScorer(8, 4), schedule=1, noise_std=1.0)
    x = torch.randn(10, 8)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.probs, b.probs)
    router.train()
    c = router(x)
    assert torch.equal(c.scores, a.scores), "scores record the clean logits"
    assert not torch.equal(c.probs, a.probs)


def test_step_k_curriculum_and_state_dict() -> None:
    schedule = mb.StepK({0: 1, 100: 2, 300: 4})
    assert [schedule.k_at(s) for s in (0, 99, 100, 299, 300, 10_000)] == [1, 1, 2, 2, 4, 4]
    assert schedule.max_k == 4
    router = mb.Router(mb.LinearScorer(4, 8), schedule=schedule)
    router.schedule.set_step(150)
    assert router(torch.randn(3, 4)).top_k == 2
    fresh = mb.Router(mb.LinearScorer(4, 8), schedule=mb.StepK({0: 1, 100: 2, 300: 4}))
    assert fresh.schedule.k == 1
    fresh.load_state_dict(router.state_dict())
    assert fresh.schedule.k == 2
    assert int(fresh.schedule.step) == 150
    assert fresh(torch.randn(3, 4), k=5).top_k == 5, "an explicit k overrides the schedule"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: mb.StepK({10: 2}), "step 0"),
        (lambda: mb.StepK({0: 0}), "milestones"),
        (lambda: mb.StepK({}), "milestones"),
        (lambda: mb.ConstantK(0), "k must be"),
        (lambda: mb.Router(mb.LinearScorer(4, 3), schedule=4), "only 3 experts"),
        (lambda: mb.Router(mb.LinearScorer(4, 3), noise_std=-1.0), "noise_std"),
        (lambda: mb.LinearScorer(0, 3), "dim"),
        (lambda: mb.CosineScorer(4, 3, temperature=0.0), "temperature"),
        (lambda: mb.ConstantK(2).set_step(-1), "step"),
    ],
)
def test_bad_arguments(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("k", [0, 5, -1])
def test_explicit_k_out_of_range(k: int) -> None:
    router = mb.Router(mb.LinearScorer(4, 4))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\]"):
        router(torch.randn(2, 4), k=k)


def test_router_rejects_non_scorer() -> None:
    with pytest.raises(TypeError, match="scorer"):
        mb.Router(torch.nn.Linear(4, 4))  # type: ignore[arg-type]


def test_the_router_names_what_readers_take_from_it() -> None:
    cosine = mb.Router(mb.CosineScorer(8, 4))
    linear = mb.Router(mb.LinearScorer(8, 4, bias=True, compute_dtype="float32"))
    for router in (cosine, linear):
        assert isinstance(router, mb.InspectableRouter)
    assert cosine.anchors is cosine.scorer.anchors_ED  # the parameter, not a copy
    assert cosine.temperature is cosine.scorer.temperature
    assert cosine.gate_weight is None
    assert cosine.gate_bias is None
    assert linear.gate_weight is linear.scorer.weight_ED
    assert linear.gate_bias is linear.scorer.bias_E
    assert linear.anchors is None
    assert linear.temperature is None
    assert linear.compute_dtype == "float32"
    assert mb.Router(mb.LinearScorer(8, 4)).compute_dtype == "input"


def test_nothing_reaches_past_the_router_protocol() -> None:
    root = Path(__file__).resolve().parent.parent / "moeblocks"
    reach = re.compile(r"router\.scorer|\.scorer\.(weight_ED|bias_E|anchors_ED|temperature)")
    hits = [
        f"{p.relative_to(root)}:{i}"
        for p in sorted(root.rglob("*.py"))
        if p.name != "routers.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if reach.search(line)
    ]
    assert hits == []
