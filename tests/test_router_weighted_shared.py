"""Shared experts weighted by the router (Inkling): AlwaysOnTopK and ScaledExperts.

A float64 per-token reference written from the formula — sigmoid scores of E routed and
S always-on experts, the top-k routed by score + selection bias, then every one of the
S; weights ``s · c · σ_j / Σ σ`` over the k + S; ``y = Σ_j w_j · expert_j(x)`` — for a layer
composed of the two parts, outputs and every gradient, over hypothesis-drawn shapes
(T = 0, experts with no token); the selection on its own; the argument checks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb


def _grads(x: torch.Tensor, layer: torch.nn.Module) -> list[torch.Tensor]:
    """The gradients of x and of every parameter, zeros where none flowed (a copy)."""
    return [
        torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in [x, *layer.parameters()]
    ]


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 5),
    S=st.integers(1, 3),
    K=st.integers(1, 3),
    D=st.integers(1, 5),
    hidden=st.integers(1, 4),
    scale=st.floats(0.25, 4.0),
    seed=st.integers(0, 2**16),
)
def test_router_weighted_shared_experts_match_a_token_loop(
    T: int, E: int, S: int, K: int, D: int, hidden: int, scale: float, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    balancer = mb.BiasBalancer(E + S, rate=0.0)
    with torch.no_grad():
        balancer.bias.normal_(0.0, 0.3)  # non-zero, the always-on ones too: it must not matter
    router = mb.Router(
        mb.LinearScorer(D, E + S),
        K,
        scoring="sigmoid",
        selection=mb.AlwaysOnTopK(S),
        weights=mb.WeightPolicy("always", scale=2.5),
        balancer=balancer,
    )
    bank = mb.ScaledExperts(mb.SwiGLUExperts(E + S, D, hidden), init=scale)
    layer = mb.MoELayer(router, mb.TorchDispatcher(), bank).double()
    x = (torch.randn(T, D, dtype=torch.float64) * 2).requires_grad_()
    res = layer(x)
    g = torch.randn(T, D, dtype=torch.float64)
    (res.out * g).sum().backward()
    got = _grads(x, layer)
    assert res.routing.experts.shape == (T, K + S)

    layer.zero_grad()
    x_ref = x.detach().clone().requires_grad_()
    w_in, w_out = bank.bank.w_in_EDF2, bank.bank.w_out_EFD
    rows = []
    for t in range(T):
        sig = torch.sigmoid(x_ref[t] @ router.gate_weight.t())  # [E + S]
        key = sig[:E].detach() + balancer.bias[:E].double()
        chosen = sorted(range(E), key=lambda e: -float(key[e]))[:K] + list(range(E, E + S))
        assert sorted(chosen) == sorted(res.routing.experts[t].tolist())
        total = sum(sig[e] for e in chosen)
        row = torch.zeros(D, dtype=torch.float64)
        for e in chosen:
            gate, up = (x_ref[t] @ w_in[e]).chunk(2)
            row = row + bank.scale * 2.5 * sig[e] / total * ((F.silu(gate) * up) @ w_out[e])
        rows.append(row)
    expected = torch.stack(rows) if rows else torch.zeros(0, D, dtype=torch.float64)
    if T:
        (expected * g).sum().backward()
    # float64, a handful of terms summed in another order.
    torch.testing.assert_close(res.out.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(got, _grads(x_ref, layer), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_always_on_top_k_lists_the_routed_then_the_always_on() -> None:
    key = torch.tensor([[0.1, 0.9, 0.5, -5.0, -6.0], [0.7, 0.2, 0.3, 9.0, 8.0]])
    chosen = mb.AlwaysOnTopK(2)(key, 2)
    # The always-on experts' keys do not compete with the routed ones.
    assert chosen.tolist() == [[1, 2, 3, 4], [0, 2, 3, 4]]


def test_scaled_experts_scale_the_bank_and_learn_the_scale() -> None:
    torch.manual_seed(0)
    inner = mb.SwiGLUExperts(2, 3, 4)
    bank = mb.ScaledExperts(inner, init=0.5)
    rows, sizes = torch.randn(5, 3), torch.tensor([2, 3])
    out = bank(rows, sizes)
    assert torch.equal(out, inner(rows, sizes) * 0.5)
    out.sum().backward()
    # d(s · y)/ds summed over the rows: the scale learns.
    torch.testing.assert_close(bank.scale.grad, inner(rows, sizes).sum().detach())
    assert (bank.num_experts, bank.dim) == (2, 3)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: mb.AlwaysOnTopK(0), "num_always must be an int >= 1"),
        (lambda: mb.AlwaysOnTopK(True), "num_always must be an int >= 1"),
        (lambda: mb.AlwaysOnTopK(2).check(2, 1), "must leave a routed expert"),
        (lambda: mb.AlwaysOnTopK(2).check(4, 3), "only 2 routed experts"),
        (lambda: mb.AlwaysOnTopK(1)(torch.zeros(2, 3), 3), "only 2 routed experts"),
        (lambda: mb.ScaledExperts(mb.SwiGLUExperts(1, 2, 2), init=math.inf), "finite"),
    ],
)
def test_bad_arguments(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        make()
