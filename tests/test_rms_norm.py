"""RMSNorm and the layer's routed_norm / out_norm (AXK-1, Gemma-4).

A float64 per-token reference written from the formula ``x / sqrt(mean(x²) + eps) · w``,
the float32 compute option against the formula Hugging Face's norms run (Llama's and
Gemma's weight order), the argument checks, and a layer with norms on its routed branch
and on its output against a per-token loop (hypothesis over shapes, k and dtypes).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.norms import RMSNorm


def _reference(x_D: list[float], eps: float, w_D: list[float] | None) -> list[float]:
    """One token, in Python floats."""
    inv = 1 / math.sqrt(sum(v * v for v in x_D) / len(x_D) + eps)
    return [v * inv * (1.0 if w_D is None else w_D[i]) for i, v in enumerate(x_D)]


def _random_weight(norm: RMSNorm, seed: int) -> RMSNorm:
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g, dtype=norm.weight.dtype))
    return norm


@pytest.mark.parametrize("weight_dtype", ["compute", "weight", "input"])
@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_matches_the_formula(weight: bool, weight_dtype: str) -> None:
    norm = RMSNorm(
        6, eps=1e-3, elementwise_affine=weight, weight_dtype=weight_dtype, compute_dtype=None
    ).double()
    if weight:
        _random_weight(norm, 0)
    x = torch.randn(2, 3, 6, dtype=torch.float64) * 3
    got = norm(x)
    w = None if norm.weight is None else norm.weight.tolist()
    expected = [_reference(row, 1e-3, w) for row in x.reshape(-1, 6).tolist()]
    # float64 throughout: a few ulps between torch's reduction and Python's sum.
    expected_TD = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(got.reshape(-1, 6), expected_TD, rtol=1e-13, atol=1e-14)


def test_float32_compute_is_the_formula_hf_runs() -> None:
    x = torch.randn(5, 16, dtype=torch.float64)
    llama = _random_weight(RMSNorm(16, weight_dtype="input").double(), 1)
    gemma = _random_weight(RMSNorm(16).double(), 1)  # "compute", the default
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
    # Bit for bit: a float64 model whose norm runs in float32 must round as HF's does.
    assert torch.equal(llama(x), llama.weight * normed.double())
    assert torch.equal(gemma(x), (normed * gemma.weight.float()).double())
    assert not torch.equal(llama(x), gemma(x)), "the two weight orders should round apart"


def test_the_three_weight_orders_round_as_their_formulas_in_bfloat16() -> None:
    # In bfloat16 all three orders differ: one rounding (compute), the float32 row times a
    # bfloat16 weight promoted to float32 (weight; Ergo), two roundings (input; Llama).
    x = torch.randn(64, 16, dtype=torch.bfloat16)
    w = torch.randn(16, generator=torch.Generator().manual_seed(4)).bfloat16()
    norms = {o: RMSNorm(16, weight_dtype=o).bfloat16() for o in ("compute", "weight", "input")}
    for norm in norms.values():
        with torch.no_grad():
            norm.weight.copy_(w)
    normed = torch.nn.functional.rms_norm(x.float(), (16,), eps=1e-6)
    assert torch.equal(norms["compute"](x), (normed * w.float()).bfloat16())
    assert torch.equal(norms["weight"](x), (normed * w).bfloat16())
    assert torch.equal(norms["input"](x), w * normed.bfloat16())
    assert not torch.equal(norms["compute"](x), norms["input"](x))


def test_pow_root_is_gemmas_formula_gradients_included() -> None:
    x = torch.randn(5, 16, dtype=torch.float64)
    norm = _random_weight(RMSNorm(16, inverse_root="pow"), 2).double()
    x_mine, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    w_hf = norm.weight.detach().clone().requires_grad_()
    x32 = x_hf.float()
    hf = (x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5) * w_hf.float()).double()
    g = torch.randn(5, 16, dtype=torch.float64)
    (norm(x_mine) * g).sum().backward()
    (hf * g).sum().backward()
    # Bit for bit, backward too: the float32 rounding of pow's gradient is Gemma's.
    assert torch.equal(norm(x_mine), hf)
    assert torch.equal(x_mine.grad, x_hf.grad)
    assert torch.equal(norm.weight.grad, w_hf.grad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 0}, "dim must be an int >= 1"),
        ({"dim": 4, "eps": -1.0}, "eps must be a finite number >= 0"),
        ({"dim": 4, "eps": math.nan}, "eps must be a finite number >= 0"),
        ({"dim": 4, "compute_dtype": torch.int32}, "compute_dtype must be None or a floating"),
        ({"dim": 4, "weight_dtype": "model"}, "weight_dtype must be one of"),
        ({"dim": 4, "inverse_root": "sqrt"}, "inverse_root must be one of"),
        ({"dim": 4, "elementwise_affine": False, "num_experts": 2}, "has no weight"),
        ({"dim": 4, "elementwise_affine": False, "offset": 1.0}, "has no weight"),
    ],
)
def test_rms_norm_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RMSNorm(**kwargs)


def test_rms_norm_names_a_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"x must have shape \[..., 4\], got \(3, 5\)"):
        RMSNorm(4)(torch.randn(3, 5))


def test_layer_rejects_a_norm_that_is_no_module() -> None:
    # The layer's own check, or beartype's in front of it when the tests run with the hook.
    with pytest.raises(TypeError, match="out_norm"):
        mb.MoELayer(
            mb.Router(mb.LinearScorer(4, 2)),
            mb.TorchDispatcher(),
            mb.SwiGLUExperts(2, 4, 3),
            out_norm=torch.tanh,
        )


def _expert(bank: mb.SwiGLUExperts, e: int, x_D: torch.Tensor) -> torch.Tensor:
    F = bank.hidden
    h = x_D @ bank.w_in_EDF2[e]
    return (torch.nn.functional.silu(h[:F]) * h[F:]) @ bank.w_out_EFD[e]


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 5),
    E=st.integers(1, 5),
    K=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_a_layer_with_norms_matches_a_per_token_reference(
    T: int, E: int, K: int, dtype: torch.dtype, seed: int
) -> None:
    K, D = min(K, E), 6
    torch.manual_seed(seed)
    layer = mb.MoELayer(
        mb.Router(mb.LinearScorer(D, E), K),
        mb.TorchDispatcher(),
        mb.SwiGLUExperts(E, D, 4),
        shared=mb.SharedExperts(mb.SwiGLUExperts(1, D, 3)),
        routed_norm=_random_weight(RMSNorm(D), seed),
        out_norm=_random_weight(RMSNorm(D, weight_dtype="input"), seed + 1),
    ).to(dtype)
    x = torch.randn(T, D, dtype=dtype)
    moe = layer(x)
    out = torch.zeros(T, D, dtype=torch.float64)
    ref = layer.double()
    for t in range(T):
        x_D = x[t].double()
        routed = sum(
            moe.routing.weights[t, j].double() * _expert(ref.experts, e, x_D)
            for j, e in enumerate(moe.routing.experts[t].tolist())
        )
        routed = torch.tensor(
            _reference(routed.tolist(), 1e-6, ref.routed_norm.weight.tolist())
        ).double()
        summed = routed + _expert(ref.shared.experts, 0, x_D)
        out[t] = torch.tensor(_reference(summed.tolist(), 1e-6, ref.out_norm.weight.tolist()))
    # Both norms compute in float32 (their default, as HF's), in a float64 layer too: float32
    # rounding (~1e-7 relative, a little more after two norms and the sums) in either dtype.
    tol = {torch.float32: 1e-4, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(moe.out.double(), out, rtol=tol, atol=tol)


def test_per_expert_scale_follows_the_expert_ids_in_any_leading_shape() -> None:
    norm = _random_weight(RMSNorm(5, num_experts=3, compute_dtype=None), 5).double()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    ids = torch.tensor([[0, 2, 2, 1], [1, 0, 2, 0]])
    got = norm(x, ids)
    for b in range(2):
        for t in range(4):
            w = norm.weight[ids[b, t]].tolist()
            # float64 against Python floats: a few ulps.
            expected = torch.tensor(_reference(x[b, t].tolist(), 1e-6, w), dtype=torch.float64)
            torch.testing.assert_close(got[b, t], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["routed_norm", "routed_input_norm"])
def test_layer_refuses_a_branch_norm_with_a_latent_space(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} cannot be combined with latent"):
        mb.MoELayer(
            mb.Router(mb.LinearScorer(6, 2)),
            mb.TorchDispatcher(),
            mb.MLPExperts(2, 3, 4),
            latent=mb.LatentProjection(6, 3),
            **{name: RMSNorm(6)},
        )


def test_out_norm_with_a_latent_space_normalises_the_layer_output() -> None:
    torch.manual_seed(0)
    parts = (mb.Router(mb.LinearScorer(6, 4), 2), mb.TorchDispatcher(), mb.MLPExperts(4, 3, 5))
    latent = mb.LatentProjection(6, 3)
    out_norm = _random_weight(RMSNorm(6), 3)
    plain = mb.MoELayer(*parts, latent=latent)
    normed = mb.MoELayer(*parts, latent=latent, out_norm=out_norm)
    x = torch.randn(7, 6)
    # The same parts, the norm on the output after the up projection: bit for bit.
    assert torch.equal(normed(x).out, out_norm(plain(x).out))
