"""ConstantScaledExperts: any bank whose output rows are multiplied by a constant, in their dtype.

The routed scaling factor that Laguna, Step-3.7 and MiniMax-M3 apply to the summed
routed output after the experts. A layer with a scaled bank against a float64
per-token loop written from the formula (hypothesis over shapes, k, E, empty experts
and dtypes), the argument checks, and the dtype the scale is applied in.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb


def _expert(bank: mb.SwiGLUExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of a SwiGLU bank on one token, from the formula."""
    gate_up = x @ bank.w_in_EDF2[e]
    gate, up = gate_up.chunk(2)
    return (F.silu(gate) * up) @ bank.w_out_EFD[e]


def _reference(layer: mb.MoELayer, x: torch.Tensor, scale: float) -> torch.Tensor:
    """``Σ_k w_tk · scale · expert_e(x_t)``, token by token."""
    routing = layer.router(x)
    bank = layer.experts.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(routing.experts[t].tolist(), routing.weights[t].tolist(), strict=True):
            out[t] += w * scale * _expert(bank, e, x[t])
    return out


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 5),
    K=st.integers(1, 3),
    scale=st.floats(0.1, 8.0),
    seed=st.integers(0, 2**16),
)
def test_a_scaled_bank_in_a_layer_matches_a_per_token_reference(
    T: int, E: int, K: int, scale: float, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    D, H = 5, 3
    router = mb.Router(mb.LinearScorer(D, E), K, scoring="sigmoid")
    bank = mb.ConstantScaledExperts(mb.SwiGLUExperts(E, D, H), scale)
    layer = mb.MoELayer(router, mb.TorchDispatcher(), bank).double()
    x = torch.randn(T, D, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x).out
        # float64 and a few dozen products: reordering only.
        torch.testing.assert_close(got, _reference(layer, x, scale), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_scale_is_applied_to_the_rows_in_their_dtype(dtype: torch.dtype) -> None:
    bank = mb.SwiGLUExperts(3, 4, 2).to(dtype)
    scaled = mb.ConstantScaledExperts(bank, 2.5)
    x = torch.randn(7, 4).to(dtype)
    sizes = torch.tensor([3, 0, 4])
    got = scaled(x, sizes)
    assert got.dtype == dtype
    # Exactly the bank's rows times the scale in that dtype (as HF's `out * factor`).
    assert torch.equal(got, bank(x, sizes) * 2.5)
    assert (scaled.num_experts, scaled.dim) == (3, 4)
    assert isinstance(scaled, mb.ExpertBank)


def test_gradients_reach_the_wrapped_bank() -> None:
    bank = mb.SwiGLUExperts(2, 3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    sizes = torch.tensor([1, 3])
    torch.autograd.gradcheck(lambda v: mb.ConstantScaledExperts(bank, 1.5)(v, sizes), (x,))
    mb.ConstantScaledExperts(bank, 1.5)(x, sizes).sum().backward()
    assert bank.w_out_EFD.grad is not None
    assert bank.w_out_EFD.grad.abs().sum() > 0


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_bad_scales_are_refused(scale: float) -> None:
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        mb.ConstantScaledExperts(mb.SwiGLUExperts(2, 3, 2), scale)


def test_a_non_bank_is_refused() -> None:
    # The tests' runtime type checker (jaxtyping) may refuse the type before the block does.
    with pytest.raises(
        TypeError, match=r"experts must be an nn\.Module expert bank|Type-check error"
    ):
        mb.ConstantScaledExperts(torch.nn.Linear(3, 3), 2.0)  # type: ignore[arg-type]
