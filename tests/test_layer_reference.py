"""MoELayer against the per-token reference: outputs and every gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import layer_forward

import moeblocks as mb

# Float32 layers are compared with a float64 reference, so the tolerance only has to
# cover float32 rounding of sums over D and F (<= 64 terms). Half-precision layers round
# every matmul output to 8 (bf16) or 11 (fp16) mantissa bits, so they get a relative
# tolerance of a few ulps of the largest value. The absolute floor covers gradients that
# are exactly zero in float64 but, in lower precision, are sums over up to 512 tokens of
# terms scaled by the router temperature (10) that cancel only to a few hundred ulps.
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}
ABS_TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_rel(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= REL_TOL[dtype] * scale + ABS_TOL[dtype], (
        f"{what}: max error {err:.3g}, scale {scale:.3g}"
    )


def build_layer(
    dim: int, num_experts: int, k: int, scorer: str, bank: str, pad_to: int
) -> mb.MoELayer:
    s = (
        mb.CosineScorer(dim, num_experts)
        if scorer == "cosine"
        else mb.LinearScorer(dim, num_experts)
    )
    router = mb.Router(s, schedule=k)
    cls = mb.SwiGLUExperts if bank == "swiglu" else mb.GELUExperts
    return mb.MoELayer(
        router, mb.TorchDispatcher(pad_to=pad_to), cls(num_experts, dim, 2 * dim + 3)
    )


@st.composite
def layer_cases(draw: st.DrawFn) -> dict:
    num_experts = draw(st.integers(1, 64))
    # Any k up to E; the reference's per-choice loop keeps large k to short inputs.
    k = draw(st.integers(1, num_experts))
    return {
        "tokens": draw(
            st.sampled_from([0, 1, 2, 3, 7, 64, 129, 512]).filter(lambda t: t <= 64 or k <= 8)
        ),
        "dim": draw(st.integers(1, 24)),
        "num_experts": num_experts,
        "k": k,
        "dtype": draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        "scorer": draw(st.sampled_from(["cosine", "linear"])),
        "bank": draw(st.sampled_from(["swiglu", "gelu"])),
        "pad_to": draw(st.sampled_from([1, 1, 4])),
        "skew": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@given(layer_cases())
def test_layer_matches_per_token_reference(case: dict) -> None:
    torch.manual_seed(case["seed"])
    dtype = case["dtype"]
    layer = build_layer(
        case["dim"], case["num_experts"], case["k"], case["scorer"], case["bank"], case["pad_to"]
    )
    if case["skew"] and case["scorer"] == "linear":
        # Tilt routing towards expert 0 so many experts get few or no tokens. (Much larger
        # weights amplify the fp16 rounding of the router logits past any fair tolerance.)
        with torch.no_grad():
            layer.router.scorer.weight_ED[0] += 5.0
    reference = copy.deepcopy(layer).double()
    layer = layer.to(dtype)
    x = torch.randn(case["tokens"], case["dim"], dtype=dtype)
    x_ref = x.detach().double().requires_grad_()
    x.requires_grad_()

    res = layer(x)
    expected = layer_forward(reference, x_ref, res.routing.experts)
    assert res.out.shape == x.shape
    assert res.out.dtype == dtype
    assert_close_rel(res.out, expected, dtype, "output")

    # The router chose the top-k of its own probabilities.
    assert torch.equal(
        res.routing.probs.gather(1, res.routing.experts),
        res.routing.probs.topk(case["k"], dim=-1).values,
    )

    grad_out = torch.randn_like(expected)
    res.out.backward(grad_out.to(dtype))
    expected.backward(grad_out)
    assert_close_rel(x.grad, x_ref.grad, dtype, "grad x")
    for (name, p), p_ref in zip(layer.named_parameters(), reference.parameters(), strict=False):
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g_ref = p_ref.grad if p_ref.grad is not None else torch.zeros_like(p_ref)
        assert_close_rel(g, g_ref, dtype, f"grad {name}")


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16), (2, 1, 3, 16), (0, 4, 16)])
def test_any_leading_shape(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = build_layer(16, 6, 2, "cosine", "swiglu", 1)
    x = torch.randn(*shape)
    res = layer(x)
    flat = layer(x.reshape(-1, 16)).out
    assert res.out.shape == x.shape
    torch.testing.assert_close(res.out.reshape(-1, 16), flat, rtol=0, atol=0)


def test_one_expert_k1_is_a_dense_mlp() -> None:
    torch.manual_seed(0)
    layer = build_layer(12, 1, 1, "linear", "swiglu", 1)
    x = torch.randn(9, 12)
    w_in = layer.experts.w_in_EDF2[0]
    gate, up = (x @ w_in).chunk(2, dim=-1)
    dense = (torch.nn.functional.silu(gate) * up) @ layer.experts.w_out_EFD[0]
    # One expert: softmax over a single score is exactly 1.
    torch.testing.assert_close(layer(x).out, dense)
