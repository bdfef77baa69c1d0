"""The parts of issue 27's layer structures: an output bias, a latent space, expert norms.

``ConstantExperts`` (a bias on the layer output, in the shared slot), ``LatentProjection``
(``MoELayer(latent=)``: the routed experts in a smaller space), ``RMSNorm`` and
``NormedExperts`` (a norm on every expert's output, shared or per expert) and
``ScaledScorer`` (a factor on the logits). Each against a float64 reference written per
token or per row from the formula, inside a layer (hypothesis over shapes, k, E and
empty experts), with gradients where the part has weights, and its argument checks.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.gating import ScaledScorer


def _relu2(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(v, min=0.0) ** 2


def _rms_reference(
    x: torch.Tensor, scale: torch.Tensor, eps: float, scale_first: bool
) -> torch.Tensor:
    """One row at a time with Python floats: ``x / sqrt(mean(x²) + eps) · s`` (or scale first)."""
    out = torch.empty_like(x)
    for r in range(x.shape[0]):
        s = scale[r].tolist()
        v = x[r].tolist()
        if scale_first:
            v = [a * b for a, b in zip(v, s, strict=True)]
        inv = 1.0 / math.sqrt(sum(a * a for a in v) / len(v) + eps)
        row = (
            [a * inv for a in v]
            if scale_first
            else [a * inv * b for a, b in zip(v, s, strict=True)]
        )
        out[r] = torch.tensor(row, dtype=x.dtype)
    return out


# --- ConstantExperts ---------------------------------------------------------------------


@settings(max_examples=20)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 4),
    D=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_constant_experts_as_shared_add_a_bias(
    T: int, E: int, D: int, seed: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(seed)
    bias = mb.SharedExperts(mb.ConstantExperts(1, D)).to(dtype)
    with torch.no_grad():
        bias.experts.value_ED.normal_()
    router = mb.Router(mb.LinearScorer(D, E), 1).to(dtype)
    bank = mb.SwiGLUExperts(E, D, 3).to(dtype)
    plain = mb.MoELayer(router, mb.TorchDispatcher(), bank)
    biased = mb.MoELayer(router, mb.TorchDispatcher(), bank, shared=bias)
    x = torch.randn(2, T, D, dtype=dtype)
    out = biased(x).out
    assert out.dtype == dtype
    # The routed output plus one vector, per token: the same additions, exactly.
    assert torch.equal(out, plain(x).out + bias.experts.value_ED[0])
    out.sum().backward()
    expected = torch.full((D,), 2.0 * T, dtype=dtype)  # one per token
    torch.testing.assert_close(bias.experts.value_ED.grad[0], expected, rtol=0, atol=0)


def test_constant_experts_output_each_experts_vector() -> None:
    bank = mb.ConstantExperts(3, 2)
    with torch.no_grad():
        bank.value_ED.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    out = bank(torch.randn(3, 2), torch.tensor([2, 0, 1]))
    assert torch.equal(out, torch.tensor([[1.0, 2.0], [1.0, 2.0], [5.0, 6.0]]))


def test_constant_experts_reject_bad_rows() -> None:
    bank = mb.ConstantExperts(2, 4)
    with pytest.raises(ValueError, match=r"grouped must have shape \[rows, 4\]"):
        bank(torch.randn(3, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"group_sizes must have shape \[2\]"):
        bank(torch.randn(3, 4), torch.tensor([3]))


# --- LatentProjection ---------------------------------------------------------------------


@settings(max_examples=25)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 4),
    K=st.integers(1, 3),
    D=st.integers(1, 5),
    L=st.integers(1, 4),
    F=st.integers(1, 4),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_latent_layer_matches_a_token_loop(
    T: int, E: int, K: int, D: int, L: int, F: int, bias: bool, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    bank = mb.MLPExperts(E, L, F, activation="relu2").double()
    latent = mb.LatentProjection(D, L, bias=bias).double()
    with torch.no_grad():
        if bias:  # zero would hide a missed bias
            latent.b_down_L.normal_()
            latent.b_up_D.normal_()
    router = mb.Router(mb.LinearScorer(D, E), K, weights=mb.WeightPolicy("always", scale=2.5))
    layer = mb.MoELayer(router.double(), mb.TorchDispatcher(), bank, latent=latent)
    x = torch.randn(T, D, dtype=torch.float64)
    res = layer(x)
    p = {n: t.detach() for n, t in latent.named_parameters()}
    expected = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        # Route on x; project the token down once, combine in L, project up once.
        z = x[t] @ p["w_down_DL"] + (p["b_down_L"] if bias else 0.0)
        acc = torch.zeros(L, dtype=torch.float64)
        for j in range(K):
            e = int(res.routing.experts[t, j])
            h = _relu2(z @ bank.w_in_EDF[e].detach()) @ bank.w_out_EFD[e].detach()
            acc += res.routing.weights[t, j].detach() * h
        expected[t] = acc @ p["w_up_LD"] + (p["b_up_D"] if bias else 0.0)
    # float64, a handful of terms summed in another order.
    torch.testing.assert_close(res.out.detach(), expected, rtol=1e-10, atol=1e-12)


def test_latent_layer_gradients_match_the_token_loop() -> None:
    torch.manual_seed(0)
    T, E, K, D, L, F = 9, 4, 2, 6, 3, 5
    bank = mb.MLPExperts(E, L, F, activation="relu2").double()
    norm = mb.RMSNorm(L, 1e-6, compute_dtype=None)
    latent = mb.LatentProjection(D, L, bias=True, norm=norm).double()
    with torch.no_grad():
        for t in (latent.b_down_L, latent.b_up_D, norm.weight):
            t.normal_()
    router = mb.Router(mb.LinearScorer(D, E), K, weights=mb.WeightPolicy("always")).double()
    layer = mb.MoELayer(router, mb.TorchDispatcher(), bank, latent=latent)
    x = torch.randn(T, D, dtype=torch.float64)
    routing = layer(x).routing
    experts, weights = routing.experts, routing.weights.detach()
    params = [latent.w_down_DL, latent.w_up_LD, latent.b_down_L, latent.b_up_D, norm.weight]
    params += [bank.w_in_EDF, bank.w_out_EFD]
    copies = [p.detach().clone().requires_grad_() for p in params]
    w_down, w_up, b_down, b_up, norm_w, w_in, w_out = copies
    rows = []
    for t in range(T):
        z = x[t] @ w_down + b_down
        z = z / torch.sqrt((z * z).mean() + 1e-6) * norm_w
        acc = sum(
            weights[t, j] * (_relu2(z @ w_in[int(experts[t, j])]) @ w_out[int(experts[t, j])])
            for j in range(K)
        )
        rows.append(acc @ w_up + b_up)
    g = torch.randn(T, D, dtype=torch.float64)
    (torch.stack(rows) * g).sum().backward()
    (layer(x).out * g).sum().backward()
    for p, ref in zip(params, copies, strict=True):
        # float64, the same products summed in another order.
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-10, atol=1e-12)


# --- RMSNorm and NormedExperts ----------------------------------------------------------


@pytest.mark.parametrize("scale_first", [False, True], ids=["scale-after", "scale-first"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("experts", [None, 3], ids=["shared", "per-expert"])
def test_rms_norm_matches_the_formula(
    experts: int | None, offset: float, scale_first: bool
) -> None:
    g = torch.Generator().manual_seed(0)
    R, D, eps = 7, 5, 1e-3
    norm = mb.RMSNorm(
        D, eps, num_experts=experts, offset=offset, scale_first=scale_first, compute_dtype=None
    ).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g, dtype=torch.float64))
    x = torch.randn(R, D, generator=g, dtype=torch.float64) * 3
    ids = None if experts is None else torch.tensor([0, 2, 2, 1, 0, 1, 2])
    w = norm.weight.detach() if ids is None else norm.weight.detach()[ids]
    scale = (offset + w).expand(R, D)
    # float64 against Python floats: a few ulps.
    expected = _rms_reference(x, scale, eps, scale_first)
    torch.testing.assert_close(norm(x, ids), expected, rtol=1e-12, atol=1e-12)


def test_rms_norm_rounds_like_a_float32_norm_in_a_float64_model() -> None:
    # HF's norms compute in float32 whatever the model dtype: so does the default.
    x = torch.randn(4, 6, dtype=torch.float64)
    got = mb.RMSNorm(6, 1e-6).double()(x)
    want = torch.nn.functional.rms_norm(x.float(), (6,), eps=1e-6).double()
    assert got.dtype == torch.float64
    assert torch.equal(got, want)


@settings(max_examples=25)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 4),
    K=st.integers(1, 3),
    D=st.integers(1, 5),
    F=st.integers(1, 4),
    per_expert=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_normed_experts_in_a_layer_match_a_token_loop(
    T: int, E: int, K: int, D: int, F: int, per_expert: bool, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    norm = mb.RMSNorm(D, 1e-5, num_experts=E if per_expert else None, compute_dtype=None)
    with torch.no_grad():
        norm.weight.normal_()
    bank = mb.NormedExperts(mb.MLPExperts(E, D, F, activation="relu2"), norm).double()
    router = mb.Router(mb.LinearScorer(D, E), K, weights=mb.WeightPolicy("always")).double()
    layer = mb.MoELayer(router, mb.TorchDispatcher(), bank)
    x = torch.randn(T, D, dtype=torch.float64)
    res = layer(x)
    w_in, w_out = bank.experts.w_in_EDF.detach(), bank.experts.w_out_EFD.detach()
    expected = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(K):
            e = int(res.routing.experts[t, j])
            h = (_relu2(x[t] @ w_in[e]) @ w_out[e])[None]
            w = norm.weight.detach()[e] if per_expert else norm.weight.detach()
            normed = _rms_reference(h, w[None], 1e-5, scale_first=False)[0]
            expected[t] += res.routing.weights[t, j].detach() * normed
    # float64, the norm written with Python floats: a few ulps, summed in another order.
    torch.testing.assert_close(res.out.detach(), expected, rtol=1e-10, atol=1e-12)


def test_per_expert_norm_gradient_reaches_only_the_used_experts() -> None:
    torch.manual_seed(1)
    norm = mb.RMSNorm(4, num_experts=3)
    bank = mb.NormedExperts(mb.MLPExperts(3, 4, 2), norm)
    bank(torch.randn(5, 4), torch.tensor([2, 0, 3])).sum().backward()
    assert torch.all(norm.weight.grad[1] == 0)  # expert 1 had no row: exactly zero
    assert norm.weight.grad[0].abs().sum() > 0


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: mb.ConstantExperts(0, 4), ValueError, "num_experts must be an int >= 1"),
        (lambda: mb.ConstantExperts(2, 0), ValueError, "dim must be an int >= 1"),
        (lambda: mb.LatentProjection(0, 4), ValueError, "dim must be an int >= 1"),
        (lambda: mb.LatentProjection(4, 0), ValueError, "latent must be an int >= 1"),
        (lambda: mb.RMSNorm(0), ValueError, "dim must be an int >= 1"),
        (lambda: mb.RMSNorm(4, -1.0), ValueError, "eps must be a finite number >= 0"),
        (lambda: mb.RMSNorm(4, num_experts=0), ValueError, "num_experts must be an int >= 1"),
        (lambda: mb.RMSNorm(4, offset=math.nan), ValueError, "offset must be a finite number"),
        (lambda: ScaledScorer(mb.LinearScorer(4, 2), 0.0), ValueError, "scale must be a finite"),
        (
            lambda: mb.MoELayer(
                mb.Router(mb.LinearScorer(4, 2)),
                mb.TorchDispatcher(),
                mb.MLPExperts(2, 4, 3),
                latent=mb.LatentProjection(4, 2),
            ),
            ValueError,
            r"experts \(dim=4, num_experts=2\) do not match .* with latent dim 2",
        ),
        (
            lambda: mb.MoELayer(
                mb.Router(mb.LinearScorer(4, 2)),
                mb.TorchDispatcher(),
                mb.MLPExperts(2, 2, 3),
                latent=mb.LatentProjection(5, 2),
            ),
            ValueError,
            "latent has dim 5, the router 4",
        ),
    ],
)
def test_structure_parts_reject_bad_arguments(build: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()


def test_per_expert_norm_needs_the_expert_ids() -> None:
    norm = mb.RMSNorm(4, num_experts=2)
    with pytest.raises(ValueError, match=r"expert .* is required with num_experts"):
        norm(torch.randn(3, 4))
    # Runtime shape checking (jaxtyping) may raise its TypeError first; it names the argument.
    with pytest.raises((ValueError, TypeError), match=r"expert must have shape \[3\]|expert"):
        norm(torch.randn(3, 4), torch.tensor([0, 1]))


# --- ScaledScorer -------------------------------------------------------------------------


@settings(max_examples=25)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 5),
    K=st.integers(1, 3),
    D=st.integers(1, 5),
    scale=st.sampled_from([0.3, 2.0, -1.5]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_scaled_scorer_in_a_router_scores_and_chooses_by_the_scaled_logits(
    T: int, E: int, K: int, D: int, scale: float, dtype: torch.dtype, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    scorer = ScaledScorer(mb.LinearScorer(D, E), scale)
    router = mb.Router(scorer, K, scoring="sigmoid", weights=mb.WeightPolicy("never")).to(dtype)
    x = torch.randn(T, D, dtype=dtype)
    routing = router(x)
    w = scorer.scorer.weight_ED.detach().double()
    for t in range(T):
        logits = [scale * float(x[t].double() @ w[e]) for e in range(E)]
        # dtype rounding of one dot product and one product.
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        got = routing.scores[t].double().tolist()
        assert all(abs(a - b) <= tol * (1 + abs(b)) for a, b in zip(got, logits, strict=True))
        best = sorted(range(E), key=lambda e: -logits[e])[:K]
        gates = sorted(1 / (1 + math.exp(-logits[e])) for e in best)
        torch.testing.assert_close(
            routing.weights[t].double().sort().values,
            torch.tensor(gates, dtype=torch.float64),
            rtol=tol,
            atol=tol,
        )
    assert router.gate_weight is scorer.scorer.weight_ED  # what hf/ writes back
