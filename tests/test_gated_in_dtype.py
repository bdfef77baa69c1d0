"""GatedInDtype: any gated activation computed in another dtype, its result cast back.

Beam evaluates its SwiGLU in float32 inside experts of any dtype. A float64 reference
written out per element (each value rounded to float32 where the formula says so), the
wrapper inside a bank inside a layer against a per-token loop (hypothesis over shapes,
k, E, empty experts), and the argument checks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb


def _f32(v: float) -> float:
    return float(np.float32(v))


def _reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``f32(silu(f32(g)) · f32(u))`` element by element, SiLU in float64 then rounded."""
    out = torch.empty_like(gate)
    for i, (g, u) in enumerate(
        zip(gate.reshape(-1).tolist(), up.reshape(-1).tolist(), strict=True)
    ):
        g32 = _f32(g)
        silu = _f32(g32 / (1 + math.exp(-g32)))
        out.view(-1)[i] = _f32(silu * _f32(u))
    return out


# torch's float32 SiLU (vectorised or not) may differ from the correctly rounded value
# by one float32 ulp (~6e-8 relative), and the product rounds once more: 3e-7.
F32_ULPS = {"rtol": 3e-7, "atol": 1e-30}


def test_float64_inputs_are_computed_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(9, 6, generator=g, dtype=torch.float64) * 3
    up = torch.randn(9, 6, generator=g, dtype=torch.float64) * 3
    got = mb.GatedInDtype(mb.GLU("silu"))(gate, up)
    assert got.dtype == torch.float64
    # Every value is a float32 number: the float32 rounding is not lost in the cast back.
    assert torch.equal(got, got.float().double())
    torch.testing.assert_close(got, _reference(gate, up), **F32_ULPS)
    plain = mb.GLU("silu")(gate, up)
    assert not torch.equal(got, plain), "float64 SiLU should differ from the float32 one"


def test_the_gradient_flows_through_both_casts() -> None:
    gate = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mb.GatedInDtype(mb.GLU("silu"))(gate, up).sum().backward()
    s = torch.sigmoid(gate.detach().float())
    expected = (s * (1 + gate.detach().float() * (1 - s)) * up.detach().float()).double()
    # float32 arithmetic on both sides, in another order.
    torch.testing.assert_close(gate.grad, expected, rtol=1e-6, atol=1e-7)
    assert up.grad is not None
    assert up.grad.dtype == torch.float64


def _expert(bank: mb.SwiGLUExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ bank.w_in_EDF2[e]).chunk(2)
    return _reference(gate[None], up[None])[0] @ bank.w_out_EFD[e]


@settings(max_examples=20, deadline=None)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 5),
    K=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_a_bank_with_it_matches_a_per_token_reference(T: int, E: int, K: int, seed: int) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    D, H = 5, 3
    bank = mb.SwiGLUExperts(E, D, H, activation=mb.GatedInDtype(mb.GLU("silu")))
    layer = mb.MoELayer(mb.Router(mb.LinearScorer(D, E), K), mb.TorchDispatcher(), bank)
    layer = layer.double()
    x = torch.randn(T, D, dtype=torch.float64)
    with torch.no_grad():
        routing = layer.router(x)
        expected = torch.zeros_like(x)
        for t in range(T):
            for e, w in zip(routing.experts[t].tolist(), routing.weights[t].tolist(), strict=True):
                expected[t] += w * _expert(bank, e, x[t])
        # The float32 hidden vector (one ulp per value, see F32_ULPS) through a float64
        # down projection: ~1e-6 relative at most on these sizes.
        torch.testing.assert_close(layer(x).out, expected, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused() -> None:
    # The tests' runtime type checker (jaxtyping) may refuse the type before the block does.
    with pytest.raises(TypeError, match=r"activation must be a gated activation|Type-check error"):
        mb.GatedInDtype("silu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"dtype must be a floating torch\.dtype"):
        mb.GatedInDtype(mb.GLU(), torch.int32)
