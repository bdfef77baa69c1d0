"""ClampedGLU (GLM-5-Next, HY-V4, DeepSeek-V4): ``act(min(g, l)) ⊙ clamp(u, −l, l)``.

A float64 reference written out per element, the activation inside a bank inside a
layer against a per-token loop (hypothesis over shapes, limits and empty experts), and
the argument checks.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.activations import ClampedGLU


def _reference(
    act: str, limit: float, gate: torch.Tensor, up: torch.Tensor, after: bool = False
) -> torch.Tensor:
    """Element by element, with Python floats: no clamp or activation of torch's."""
    fns = {
        "silu": lambda v: v / (1 + math.exp(-v)),
        "relu": lambda v: max(v, 0.0),
        "gelu": lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))),
    }
    out = torch.empty_like(gate)
    for i, (g, u) in enumerate(
        zip(gate.reshape(-1).tolist(), up.reshape(-1).tolist(), strict=True)
    ):
        u = -limit if u < -limit else (limit if u > limit else u)
        if after:  # clamp the activated gate
            a = fns[act](g)
            out.view(-1)[i] = (a if a < limit else limit) * u
        else:
            out.view(-1)[i] = fns[act](g if g < limit else limit) * u
    return out


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("act", ["silu", "relu", "gelu"])
def test_clamped_glu_matches_the_formula(act: str, after: bool) -> None:
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    up = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    limit = 1.5
    got = ClampedGLU(act, limit, after_activation=after)(gate, up)
    # float64: torch's silu/gelu and math's agree to a few ulps.
    expected = _reference(act, limit, gate, up, after)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert ((gate > limit) & (up.abs() > limit)).any(), "the input should cross both clamps"


def test_clamped_glu_gradient_stops_at_the_clamp() -> None:
    gate = torch.tensor([[0.5, 3.0]], dtype=torch.float64, requires_grad=True)
    up = torch.tensor([[-4.0, 0.5]], dtype=torch.float64, requires_grad=True)
    ClampedGLU("silu", 2.0)(gate, up).sum().backward()
    assert gate.grad[0, 1] == 0  # gate clamped from above: no gradient
    assert up.grad[0, 0] == 0  # up clamped from below
    assert gate.grad[0, 0] != 0
    assert up.grad[0, 1] != 0


def test_clamped_glu_after_activation_clamps_the_activated_gate() -> None:
    # silu(1.5) ≈ 1.23 < 1.3 = l: not clamped after the activation, but 1.5 > l before it.
    gate = torch.tensor([[1.5, 4.0]], dtype=torch.float64, requires_grad=True)
    up = torch.ones(1, 2, dtype=torch.float64)
    out = ClampedGLU("silu", 1.3, after_activation=True)(gate, up)
    assert out[0, 0] == torch.nn.functional.silu(gate[0, 0])
    assert out[0, 1] == 1.3
    out.sum().backward()
    assert gate.grad[0, 0] != 0
    assert gate.grad[0, 1] == 0


@settings(max_examples=25)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 4),
    K=st.integers(1, 2),
    D=st.integers(1, 5),
    F=st.integers(1, 4),
    limit=st.floats(0.05, 3.0),
    after=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_clamped_glu_in_a_layer_matches_a_token_loop(
    T: int, E: int, K: int, D: int, F: int, limit: float, after: bool, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    bank = mb.SwiGLUExperts(E, D, F, activation=ClampedGLU("silu", limit, after)).double()
    router = mb.Router(mb.LinearScorer(D, E), K, weights=mb.WeightPolicy("always")).double()
    layer = mb.MoELayer(router, mb.TorchDispatcher(), bank)
    x = torch.randn(T, D, dtype=torch.float64) * 2
    res = layer(x)
    expected = torch.zeros_like(x)
    for t in range(T):
        for j in range(K):
            e = int(res.routing.experts[t, j])
            gate, up = (x[t] @ bank.w_in_EDF2[e]).chunk(2)
            h = _reference("silu", limit, gate.detach(), up.detach(), after)
            expected[t] += res.routing.weights[t, j].detach() * (h @ bank.w_out_EFD[e].detach())
    # float64, a handful of terms summed in another order.
    torch.testing.assert_close(res.out.detach(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"limit": 0.0}, ValueError, "limit must be a finite number > 0"),
        ({"limit": math.inf}, ValueError, "limit must be a finite number > 0"),
        ({"activation": "tanh"}, ValueError, "activation must be one of"),
    ],
)
def test_clamped_glu_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ClampedGLU(**kwargs)
