"""SoftCappedSwiGLU (Inkling2): ``c_g·tanh(g/c_g) · σ(g) ⊙ c_u·tanh(u/c_u)``.

A float64 reference written out per element, the float32 compute option, the gradient
against finite differences, the activation inside a bank inside a layer against a
per-token loop (hypothesis over shapes, caps and empty experts), and the argument checks.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.activations import SoftCappedSwiGLU


def _reference(
    gate_cap: float, up_cap: float, gate: torch.Tensor, up: torch.Tensor
) -> torch.Tensor:
    """Element by element, with Python floats: no tanh or sigmoid of torch's."""
    out = [
        gate_cap * math.tanh(g / gate_cap) / (1 + math.exp(-g)) * up_cap * math.tanh(u / up_cap)
        for g, u in zip(gate.reshape(-1).tolist(), up.reshape(-1).tolist(), strict=True)
    ]
    return torch.tensor(out, dtype=gate.dtype).view_as(gate)


def test_soft_capped_swiglu_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    up = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    got = SoftCappedSwiGLU(1.5, 2.0)(gate, up)
    # float64: torch's tanh/sigmoid and math's agree to a few ulps.
    torch.testing.assert_close(got, _reference(1.5, 2.0, gate, up), rtol=1e-12, atol=1e-14)
    assert (gate.abs() > 1.5).any(), "the gate should cross its cap"
    assert (up.abs() > 2.0).any(), "up should cross its cap"
    # Not the silu of a capped gate: the sigmoid sees the raw gate.
    capped = torch.tanh(gate / 1.5) * 1.5
    assert not torch.allclose(got, torch.nn.functional.silu(capped) * torch.tanh(up / 2) * 2)


def test_large_caps_give_swiglu() -> None:
    gate = torch.linspace(-3, 3, 13, dtype=torch.float64).view(1, -1)
    up = torch.linspace(2, -2, 13, dtype=torch.float64).view(1, -1)
    got = SoftCappedSwiGLU(1e6, 1e6)(gate, up)
    # c·tanh(v/c) = v (1 − v²/(3c²) + …): a relative change of ~3e-12 at c = 1e6.
    torch.testing.assert_close(got, mb.GLU("silu")(gate, up), rtol=1e-10, atol=1e-14)


def test_float32_compute_rounds_like_a_cast() -> None:
    g = torch.Generator().manual_seed(1)
    gate = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3
    up = torch.randn(4, 6, generator=g, dtype=torch.float64) * 3
    got = SoftCappedSwiGLU(1.0, 1.5, dtype=torch.float32)(gate, up)
    assert got.dtype == torch.float64
    expected = SoftCappedSwiGLU(1.0, 1.5)(gate.float(), up.float()).double()
    assert torch.equal(got, expected)
    assert not torch.equal(got, SoftCappedSwiGLU(1.0, 1.5)(gate, up))


def test_soft_capped_swiglu_gradient() -> None:
    g = torch.Generator().manual_seed(2)
    gate = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    up = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(SoftCappedSwiGLU(1.0, 1.5), (gate, up))


@settings(max_examples=25)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 4),
    K=st.integers(1, 2),
    D=st.integers(1, 5),
    F=st.integers(1, 4),
    gate_cap=st.floats(0.05, 5.0),
    up_cap=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**16),
)
def test_soft_capped_swiglu_in_a_layer_matches_a_token_loop(
    T: int, E: int, K: int, D: int, F: int, gate_cap: float, up_cap: float, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    act = SoftCappedSwiGLU(gate_cap, up_cap)
    bank = mb.SwiGLUExperts(E, D, F, activation=act).double()
    router = mb.Router(mb.LinearScorer(D, E), K, weights=mb.WeightPolicy("always")).double()
    layer = mb.MoELayer(router, mb.TorchDispatcher(), bank)
    x = torch.randn(T, D, dtype=torch.float64) * 2
    res = layer(x)
    expected = torch.zeros_like(x)
    for t in range(T):
        for j in range(K):
            e = int(res.routing.experts[t, j])
            gate, up = (x[t] @ bank.w_in_EDF2[e]).detach().chunk(2)
            h = _reference(gate_cap, up_cap, gate, up)
            expected[t] += res.routing.weights[t, j].detach() * (h @ bank.w_out_EFD[e].detach())
    # float64, a handful of terms summed in another order.
    torch.testing.assert_close(res.out.detach(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"gate_cap": 0.0}, ValueError, "gate_cap must be a finite number > 0"),
        ({"up_cap": math.inf}, ValueError, "up_cap must be a finite number > 0"),
        ({"up_cap": -1.0}, ValueError, "up_cap must be a finite number > 0"),
        ({"dtype": torch.int32}, TypeError, "dtype must be None or a floating"),
    ],
)
def test_soft_capped_swiglu_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SoftCappedSwiGLU(**kwargs)
