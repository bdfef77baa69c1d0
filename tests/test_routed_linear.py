"""LinearExperts and RoutedLinear: routed per-expert linear maps (a mixture of attention heads).

Against a float64 loop over tokens written from the formula (map: ``x · W_in[e_tk]`` per
slot; reduce: ``Σ_k w_tk · h_tk · W_out[e_tk] + b``), with every gradient, hypothesis over
T (incl. 0), E, K, widths and skewed routing (experts with no token), and the checks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.routed_linear import RoutedLinear


def _moa(D: int, E: int, K: int, H: int, seed: int) -> RoutedLinear:
    torch.manual_seed(seed)
    router = mb.Router(mb.LinearScorer(D, E), K, scoring="softmax_topk")
    moa = RoutedLinear(router, mb.TorchDispatcher(), H).double()
    with torch.no_grad():
        moa.bias_D.normal_()  # zero would hide a missed bias
    return moa


@settings(max_examples=25)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 4),
    K=st.integers(1, 3),
    D=st.integers(1, 5),
    H=st.integers(1, 4),
    skew=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_map_and_reduce_match_a_token_loop(
    T: int, E: int, K: int, D: int, H: int, skew: bool, seed: int
) -> None:
    K = min(K, E)
    moa = _moa(D, E, K, H, seed)
    x = torch.randn(T, D, dtype=torch.float64)
    if skew:  # every token leans on one router row: the other experts may get no token
        x = 0.1 * x + moa.router.gate_weight[0].detach()
    slots, routing, layout = moa.map(x)
    w_in, w_out = moa.map_in.w_EDO.detach(), moa.map_out.w_EDO.detach()
    expected = torch.zeros(T, K, H, dtype=torch.float64)
    for t in range(T):
        for j in range(K):
            expected[t, j] = x[t] @ w_in[int(routing.experts[t, j])]
    # float64: one dot product per element, in another order at most.
    torch.testing.assert_close(slots.detach(), expected, rtol=1e-12, atol=1e-12)

    h = torch.randn(T, K, H, dtype=torch.float64)  # what attention would compute per slot
    out = moa.reduce(h, routing, layout)
    ref = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        ref[t] = moa.bias_D.detach()
        for j in range(K):
            e = int(routing.experts[t, j])
            ref[t] += routing.weights[t, j].detach() * (h[t, j] @ w_out[e])
    torch.testing.assert_close(out.detach(), ref, rtol=1e-12, atol=1e-12)


def test_gradients_match_the_token_loop() -> None:
    T, E, K, D, H = 7, 4, 2, 5, 3
    moa = _moa(D, E, K, H, 0)
    x = torch.randn(T, D, dtype=torch.float64)
    slots, routing, layout = moa.map(x)
    out = moa.reduce(torch.tanh(slots), routing, layout)  # a nonlinearity between the maps
    g = torch.randn(T, D, dtype=torch.float64)
    (out * g).sum().backward()
    experts, weights = routing.experts, routing.weights.detach()
    w_in, w_out, b = (
        p.detach().clone().requires_grad_()
        for p in (moa.map_in.w_EDO, moa.map_out.w_EDO, moa.bias_D)
    )
    rows = []
    for t in range(T):
        acc = b
        for j in range(K):
            e = int(experts[t, j])
            acc = acc + weights[t, j] * (torch.tanh(x[t] @ w_in[e]) @ w_out[e])
        rows.append(acc)
    (torch.stack(rows) * g).sum().backward()
    for got, want in ((moa.map_in.w_EDO, w_in), (moa.map_out.w_EDO, w_out), (moa.bias_D, b)):
        # float64, the same products summed in another order.
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
    assert torch.all(
        moa.map_in.w_EDO.grad[torch.bincount(experts.reshape(-1), minlength=E) == 0] == 0
    )


def test_linear_experts_as_a_layer_bank_equal_per_expert_matmuls() -> None:
    torch.manual_seed(1)
    bank = mb.LinearExperts(3, 4, 4)
    rows = torch.randn(6, 4)
    out = bank(rows, torch.tensor([2, 0, 4]))
    torch.testing.assert_close(out[:2], rows[:2] @ bank.w_EDO[0], rtol=0, atol=0)
    torch.testing.assert_close(out[2:], rows[2:] @ bank.w_EDO[2], rtol=0, atol=0)
    layer = mb.MoELayer(mb.Router(mb.LinearScorer(4, 3), 2), mb.TorchDispatcher(), bank)
    assert layer(torch.randn(5, 4)).out.shape == (5, 4)


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: mb.LinearExperts(0, 4, 4), ValueError, "num_experts must be an int >= 1"),
        (lambda: mb.LinearExperts(2, 4, 4, "cuda"), ValueError, "backend must be"),
        (
            lambda: RoutedLinear(mb.LinearScorer(4, 2), mb.TorchDispatcher(), 3),
            TypeError,
            "router",
        ),
    ],
)
def test_routed_linear_rejects_bad_arguments(build: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()


def test_reduce_rejects_slots_of_another_shape() -> None:
    moa = _moa(4, 3, 2, 5, 0)
    slots, routing, layout = moa.map(torch.randn(6, 4, dtype=torch.float64))
    with pytest.raises((ValueError, TypeError), match=r"slots must have shape \[6, 2, 5\]|slots"):
        moa.reduce(slots[:, :, :4], routing, layout)
