"""Dynamic k: TopP and ExpertChoice against float64 per-token references.

A dynamic-k ``Routing`` marks its real slots in ``slots``; the layer computes only those
(checked by counting the rows the expert bank receives), the losses and the inspection
count only those, and the weights renormalise over them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from reference import expert_forward

import moeblocks as mb
from moeblocks.inspect import concat_routings, expert_counts, mean_k


def top_p_token(key_E: list[float], p: float, k_min: int, k_max: int) -> list[int]:
    """Experts of one token, best first, until their normalised mass reaches p."""
    order = sorted(range(len(key_E)), key=lambda e: -key_E[e])  # stable, as torch's sort
    total = sum(key_E[e] for e in order)
    taken, before = [], 0.0
    for e in order:
        if before >= p * 1.0 and len(taken) >= k_min:
            break
        taken.append(e)
        before += key_E[e] / total if total > 0 else 0.0
    while len(taken) < k_min:
        taken.append(order[len(taken)])
    return taken[:k_max]


def expert_choice_tokens(key_TE: torch.Tensor, C: int, k_max: int) -> list[list[int]]:
    """Per token, the experts that chose it among their C best tokens, best first."""
    T, E = key_TE.shape
    chosen = [[] for _ in range(T)]
    for e in range(E):
        for t in sorted(range(T), key=lambda t: -float(key_TE[t, e]))[:C]:
            chosen[t].append(e)
    return [sorted(es, key=lambda e: -float(key_TE[t, e]))[:k_max] for t, es in enumerate(chosen)]


def real_slots(experts: torch.Tensor, slots: torch.Tensor) -> list[list[int]]:
    return [
        [int(e) for e, s in zip(row, mask, strict=True) if s]
        for row, mask in zip(experts, slots, strict=True)
    ]


@given(
    T=st.integers(0, 9),
    E=st.integers(1, 8),
    p=st.floats(0.05, 1.0),
    k_min=st.integers(1, 3),
    extra=st.integers(0, 8),
    seed=st.integers(0, 2**16),
)
@example(T=2, E=4, p=0.5, k_min=1, extra=3, seed=0)
def test_top_p_matches_the_per_token_reference(T, E, p, k_min, extra, seed) -> None:
    k_min = min(k_min, E)
    k_max = min(k_min + extra, E)
    g = torch.Generator().manual_seed(seed)
    key = torch.softmax(torch.randn(T, E, generator=g, dtype=torch.float64) * 3, -1)
    experts, slots = mb.TopP(p, k_min, k_max).select(key, 1)
    assert experts.shape == slots.shape == (T, k_max)
    want = [top_p_token(key[t].tolist(), p, k_min, k_max) for t in range(T)]
    assert real_slots(experts, slots) == want
    # Real slots come first: a token's mask is a prefix.
    assert torch.equal(slots, torch.sort(slots.int(), dim=1, descending=True).values.bool())


@given(
    T=st.integers(1, 10),
    E=st.integers(1, 8),
    k=st.integers(1, 8),
    factor=st.sampled_from([0.5, 1.0, 1.5, 3.0]),
    width=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_expert_choice_matches_the_per_expert_reference(T, E, k, factor, width, seed) -> None:
    k, width = min(k, E), min(width, E)
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(T, E, generator=g, dtype=torch.float64)  # no ties
    selection = mb.ExpertChoice(factor, width)
    experts, slots = selection.select(key, k)
    C = min(T, math.ceil(factor * T * k / E))
    assert selection.capacity(T, k, E) == C
    assert real_slots(experts, slots) == expert_choice_tokens(key, C, width)
    if width == E:  # nothing cut: every expert takes exactly C tokens
        assert torch.equal(expert_counts(_routing(key, experts, slots)), torch.full((E,), C))


def _routing(key: torch.Tensor, experts: torch.Tensor, slots: torch.Tensor) -> mb.Routing:
    weights = torch.zeros(experts.shape, dtype=key.dtype)
    return mb.Routing(key, key, experts, weights, slots=slots)


@pytest.mark.parametrize("renormalize", ["always", "k>1", "never"])
def test_weights_renormalise_over_real_slots(renormalize: str) -> None:
    router = mb.Router(
        mb.LinearScorer(6, 8), k=2, selection=mb.ExpertChoice(1.0, 4),
        weights=mb.WeightPolicy(renormalize),
    ).double()  # fmt: skip
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    r = router(x)
    for t in range(10):
        real = r.slots[t]
        gates = r.probs[t, r.experts[t][real]]
        n = int(real.sum())
        renorm = renormalize == "always" or (renormalize == "k>1" and n > 1)
        want = gates / gates.sum() if renorm and n else gates
        torch.testing.assert_close(r.weights[t][real], want, rtol=1e-12, atol=0)  # float64
        assert torch.all(r.weights[t][~real] == 0)
    r.weights.sum().backward()
    assert torch.isfinite(x.grad).all()  # tokens without experts give no NaN gradient


class CountingBank(torch.nn.Module):
    """An expert bank that records how many rows it was asked to compute."""

    def __init__(self, bank: mb.GELUExperts) -> None:
        super().__init__()
        self.bank, self.num_experts, self.dim, self.rows = bank, bank.num_experts, bank.dim, []

    def forward(self, grouped: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        self.rows.append(int(grouped.shape[0]))
        return self.bank(grouped, group_sizes)


@pytest.mark.parametrize(
    "selection", [mb.TopP(0.6, 1, 4), mb.ExpertChoice(1.0, 3)], ids=["top-p", "expert-choice"]
)
def test_layer_computes_real_slots_only_and_matches_the_loop(selection) -> None:
    torch.manual_seed(0)
    E, D = 6, 5
    bank = CountingBank(mb.GELUExperts(E, D, 7))
    router = mb.Router(mb.LinearScorer(D, E), k=2, selection=selection)
    layer = mb.MoELayer(router, mb.TorchDispatcher(), bank, {"lb": mb.LoadBalanceLoss()})
    layer = layer.double()
    x = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    res = layer(x)
    r = res.routing
    assert bank.rows == [int(r.slots.sum())]  # the empty slots were never computed
    assert bank.rows[0] < r.slots.numel()
    tokens = x.reshape(-1, D)
    ref = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(r.top_k):
            if r.slots[t, j]:
                e = r.experts[t, j : j + 1]
                ref[t] = (
                    ref[t] + r.weights[t, j] * expert_forward(bank.bank, tokens[t : t + 1], e)[0]
                )
    # Float64, the same products summed in another order: rounding only.
    torch.testing.assert_close(res.out.reshape(-1, D), ref, rtol=1e-12, atol=1e-12)
    (g_out,) = torch.autograd.grad(res.out.sum(), x, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-12, atol=1e-12)


def test_losses_and_inspection_count_real_slots_only() -> None:
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), -1)
    experts = torch.tensor([[0, 1, 2], [1, 0, 3], [2, 3, 0], [3, 0, 1], [0, 2, 1], [1, 2, 3]])
    slots = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 0]]).bool()
    r = mb.Routing(probs.log(), probs, experts, torch.zeros(6, 3, dtype=torch.float64), slots=slots)
    counts = torch.zeros(4, dtype=torch.float64)
    for t in range(6):
        for j in range(3):
            counts[experts[t, j]] += float(slots[t, j])
    stats = mb.TokenStats.of(r)
    assert torch.equal(stats.slot_count, counts)
    assert float(stats.k_sum) == 9.0
    f, P = counts / 9.0, probs.mean(0)
    lb = mb.LoadBalanceLoss(weight=1.0).from_stats(stats)
    torch.testing.assert_close(lb, 4 * (f * P).sum(), rtol=1e-12, atol=0)  # float64
    seq = mb.SequenceBalanceLoss(weight=1.0)(r)
    torch.testing.assert_close(seq, (4 * f * probs.mean(0)).sum(), rtol=1e-12, atol=0)
    assert torch.equal(expert_counts(r), counts.long())
    assert mean_k(r) == 1.5
    assert r.k_per_token.tolist() == [2, 1, 3, 0, 1, 2]
    both = concat_routings([r, mb.Routing(r.scores, r.probs, experts, r.weights)])
    assert both.slots.shape == (12, 3)
    assert mean_k(both) == (9 + 18) / 12


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: mb.TopP(0.0), "p must be"),
        (lambda: mb.TopP(0.5, 3, 2), "k_min"),
        (lambda: mb.ExpertChoice(0.0), "capacity_factor"),
        (lambda: mb.Router(mb.LinearScorer(4, 3), selection=mb.TopP(0.5, k_max=4)), "exceeds"),
        (lambda: mb.TopP(0.5).select(-torch.ones(2, 3), 1), "non-negative"),
    ],
)
def test_bad_arguments(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_capacity_and_dynamic_k_do_not_mix() -> None:
    router = mb.Router(mb.LinearScorer(4, 4), selection=mb.TopP(0.5, 1, 2))
    layer = mb.MoELayer(
        router, mb.TorchDispatcher(), mb.GELUExperts(4, 4, 8), capacity=mb.Capacity(factor=1.0)
    )
    with pytest.raises(ValueError, match="capacity limit does not apply to a dynamic-k"):
        layer(torch.randn(3, 4))
