"""TorchDispatcher: grouping, stability, padding, identity and determinism."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moeblocks as mb


@st.composite
def routings(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    num_experts = draw(st.integers(1, 20))
    k = draw(st.integers(1, min(num_experts, 4)))
    tokens = draw(st.integers(0, 40))
    skew = draw(st.booleans())
    g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    scores = torch.rand(tokens, num_experts, generator=g)
    if skew:
        scores[:, 0] += 10  # every token's first choice is expert 0
    return scores.topk(k, dim=-1).indices, num_experts


@given(routings(), st.sampled_from([1, 2, 4, 16]))
def test_layout_invariants(case: tuple[torch.Tensor, int], pad_to: int) -> None:
    experts_TK, E = case
    layout = mb.build_layout(experts_TK, E, pad_to=pad_to)
    flat = experts_TK.reshape(-1)
    N = flat.numel()
    assert int(layout.counts.sum()) == N
    assert torch.equal(layout.counts, torch.bincount(flat, minlength=E))
    assert bool((layout.group_sizes % pad_to == 0).all())
    assert bool((layout.group_sizes >= layout.counts).all())
    assert int(layout.offsets[-1]) == layout.num_rows
    real = layout.slot_of_row >= 0
    assert int(real.sum()) == N
    # row_of_slot and slot_of_row are inverse to each other.
    assert torch.equal(layout.slot_of_row[layout.row_of_slot], torch.arange(N))
    for e in range(E):
        start, stop = int(layout.offsets[e]), int(layout.offsets[e + 1])
        seg = layout.slot_of_row[start:stop]
        slots = seg[seg >= 0]
        # The real rows of a segment come first, belong to expert e, in slot order.
        assert torch.equal(slots, seg[: len(slots)])
        assert bool((flat[slots] == e).all())
        assert torch.equal(slots, torch.sort(slots).values)


@given(routings(), st.sampled_from([1, 4]), st.integers(1, 9))
def test_permute_unpermute(case: tuple[torch.Tensor, int], pad_to: int, dim: int) -> None:
    experts_TK, E = case
    T, K = experts_TK.shape
    tokens = torch.randn(T, dim, dtype=torch.float64)
    weights = torch.rand(T, K, dtype=torch.float64)
    routing = mb.Routing(torch.zeros(T, E), torch.zeros(T, E), experts_TK, weights.float())
    d = mb.TorchDispatcher(pad_to=pad_to)
    grouped, layout = d.permute(tokens, routing)
    assert grouped.shape == (layout.num_rows, dim)
    # Every row holds the token of its slot; padding rows are zero.
    for r, slot in enumerate(layout.slot_of_row.tolist()):
        expected = tokens[slot // K] if slot >= 0 else torch.zeros(dim, dtype=tokens.dtype)
        assert torch.equal(grouped[r], expected)
    # unpermute(permute(x)) with weights w is x · Σ_j w_j (fixed-order sum).
    out = d.unpermute(grouped, layout, weights)
    torch.testing.assert_close(out, tokens * weights.sum(1, keepdim=True))


@given(routings())
def test_unit_weights_k1_identity_and_gradients(case: tuple[torch.Tensor, int]) -> None:
    experts_TK, E = case
    experts_T1 = experts_TK[:, :1]
    T = experts_T1.shape[0]
    x = torch.randn(T, 5, requires_grad=True)
    w = torch.ones(T, 1, requires_grad=True)
    routing = mb.Routing(torch.zeros(T, E), torch.zeros(T, E), experts_T1, w)
    d = mb.TorchDispatcher()
    grouped, layout = d.permute(x, routing)
    out = d.unpermute(grouped, layout, w)
    assert torch.equal(out, x)
    g = torch.randn(T, 5)
    out.backward(g)
    assert torch.equal(x.grad, g)
    # d out / d w = <expert output, grad>, here <x, g>.
    torch.testing.assert_close(w.grad, (x * g).sum(1, keepdim=True))


def test_deterministic_repeated_calls() -> None:
    torch.manual_seed(0)
    experts = torch.randint(0, 7, (300, 3))
    x = torch.randn(300, 16, requires_grad=True)
    w = torch.rand(300, 3)
    routing = mb.Routing(torch.zeros(300, 7), torch.zeros(300, 7), experts, w)
    d = mb.TorchDispatcher()
    results = []
    for _ in range(3):
        x.grad = None
        grouped, layout = d.permute(x, routing)
        out = d.unpermute(grouped * 1.5, layout, w)
        out.square().sum().backward()
        results.append((out.detach(), x.grad.clone()))
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0])
        assert torch.equal(grad, results[0][1])


def test_bad_pad_to() -> None:
    with pytest.raises(ValueError, match="pad_to"):
        mb.TorchDispatcher(pad_to=0)
    with pytest.raises(ValueError, match="dispatcher name"):
        mb.make_dispatcher("cuda")
    assert isinstance(mb.make_dispatcher("torch"), mb.TorchDispatcher)


@pytest.mark.parametrize("pad_to", [1, 4])
def test_gradcheck_float64(pad_to: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    experts = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0]])
    routing = mb.Routing(torch.zeros(5, 3), torch.zeros(5, 3), experts, w.detach().float())
    d = mb.TorchDispatcher(pad_to=pad_to)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        grouped, layout = d.permute(x, routing)
        return d.unpermute(grouped * grouped, layout, w)  # a non-linear expert in between

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))
