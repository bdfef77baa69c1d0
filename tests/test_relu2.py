"""Squared ReLU (``"relu2"``, NemotronH and Ergo experts): ``relu(x)²``.

A float64 element-wise reference, its gradient, and ``MLPExperts(activation="relu2")``
inside a layer against a per-token loop over hypothesis-drawn shapes (empty experts and
T = 0 included).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.activations import ACTIVATIONS, activation_fn


def _reference(x: torch.Tensor) -> torch.Tensor:
    values = [v * v if v > 0 else 0.0 for v in x.reshape(-1).tolist()]
    return torch.tensor(values, dtype=x.dtype).view_as(x)


def test_relu2_matches_the_formula_and_its_gradient() -> None:
    assert "relu2" in ACTIVATIONS
    x = torch.tensor([[-2.0, -0.0, 0.5, 3.0]], dtype=torch.float64, requires_grad=True)
    y = activation_fn("relu2")(x)
    assert torch.equal(y.detach(), _reference(x.detach()))  # exact: one product
    y.sum().backward()
    assert x.grad.tolist() == [[0.0, 0.0, 1.0, 6.0]]  # 2·relu(x)


@settings(max_examples=25)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 4),
    K=st.integers(1, 2),
    D=st.integers(1, 5),
    F=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_relu2_experts_in_a_layer_match_a_token_loop(
    T: int, E: int, K: int, D: int, F: int, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    bank = mb.MLPExperts(E, D, F, activation="relu2").double()
    router = mb.Router(mb.LinearScorer(D, E), K, weights=mb.WeightPolicy("always")).double()
    layer = mb.MoELayer(router, mb.TorchDispatcher(), bank)
    x = torch.randn(T, D, dtype=torch.float64)
    res = layer(x)
    expected = torch.zeros_like(x)
    for t in range(T):
        for j in range(K):
            e = int(res.routing.experts[t, j])
            h = _reference((x[t] @ bank.w_in_EDF[e]).detach())
            expected[t] += res.routing.weights[t, j].detach() * (h @ bank.w_out_EFD[e].detach())
    # float64, a handful of products summed in another order.
    torch.testing.assert_close(res.out.detach(), expected, rtol=1e-10, atol=1e-12)
