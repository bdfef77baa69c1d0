"""ConstantExperts (an output bias in the shared slot) and ProjectedExperts (a latent bank).

Each against a float64 reference written per token from the formula, inside a layer
(hypothesis over shapes, k, E and empty experts), with its gradients, and its argument
checks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb


def _relu2(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(v, min=0.0) ** 2


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
def test_projected_experts_in_a_layer_match_a_token_loop(
    T: int, E: int, K: int, D: int, L: int, F: int, bias: bool, seed: int
) -> None:
    K = min(K, E)
    torch.manual_seed(seed)
    inner = mb.MLPExperts(E, L, F, activation="relu2")
    bank = mb.ProjectedExperts(inner, D, bias=bias).double()
    with torch.no_grad():
        if bias:
            bank.b_down_L.normal_()  # zero would hide a missed bias
    router = mb.Router(mb.LinearScorer(D, E), K, weights=mb.WeightPolicy("always", scale=2.5))
    layer = mb.MoELayer(router.double(), mb.TorchDispatcher(), bank)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    res = layer(x)
    w_down, w_up = bank.w_down_DL.detach(), bank.w_up_LD.detach()
    expected = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        # The published form: project the token down once, combine in L, project up once.
        z = x[t].detach() @ w_down + (bank.b_down_L.detach() if bias else 0.0)
        acc = torch.zeros(L, dtype=torch.float64)
        for j in range(K):
            e = int(res.routing.experts[t, j])
            h = _relu2(z @ inner.w_in_EDF[e].detach()) @ inner.w_out_EFD[e].detach()
            acc += res.routing.weights[t, j].detach() * h
        expected[t] = acc @ w_up
    # float64; the up projection runs per copy before the sum here: rounding only.
    torch.testing.assert_close(res.out.detach(), expected, rtol=1e-10, atol=1e-12)


def test_projected_experts_gradients_match_the_published_form() -> None:
    torch.manual_seed(0)
    T, E, K, D, L, F = 9, 4, 2, 6, 3, 5
    inner = mb.MLPExperts(E, L, F, activation="relu2")
    bank = mb.ProjectedExperts(inner, D, bias=True).double()
    with torch.no_grad():
        bank.b_down_L.normal_()
    router = mb.Router(mb.LinearScorer(D, E), K, weights=mb.WeightPolicy("always")).double()
    layer = mb.MoELayer(router, mb.TorchDispatcher(), bank)
    x = torch.randn(T, D, dtype=torch.float64)
    routing = layer(x).routing
    experts, weights = routing.experts, routing.weights.detach()
    params = [bank.w_down_DL, bank.b_down_L, bank.w_up_LD, inner.w_in_EDF, inner.w_out_EFD]
    copies = [p.detach().clone().requires_grad_() for p in params]
    w_down, b_down, w_up, w_in, w_out = copies
    rows = []
    for t in range(T):
        z = x[t] @ w_down + b_down
        acc = sum(
            weights[t, j] * (_relu2(z @ w_in[int(experts[t, j])]) @ w_out[int(experts[t, j])])
            for j in range(K)
        )
        rows.append(acc @ w_up)
    g = torch.randn(T, D, dtype=torch.float64)
    (torch.stack(rows) * g).sum().backward()
    (layer(x).out * g).sum().backward()
    for p, ref in zip(params, copies, strict=True):
        # float64, the same products summed in another order.
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-10, atol=1e-12)


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
    torch.testing.assert_close(
        bias.experts.value_ED.grad[0], torch.full((D,), 2.0 * T, dtype=dtype), rtol=0, atol=0
    )


def test_constant_experts_output_each_experts_vector() -> None:
    bank = mb.ConstantExperts(3, 2)
    with torch.no_grad():
        bank.value_ED.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    sizes = torch.tensor([2, 0, 1])
    out = bank(torch.randn(3, 2), sizes)
    assert torch.equal(out, torch.tensor([[1.0, 2.0], [1.0, 2.0], [5.0, 6.0]]))


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: mb.ConstantExperts(0, 4), ValueError, "num_experts must be an int >= 1"),
        (lambda: mb.ConstantExperts(2, 0), ValueError, "dim must be an int >= 1"),
        (
            lambda: mb.ProjectedExperts(torch.nn.Linear(2, 2), 4),
            TypeError,
            "expert bank|ExpertBank",
        ),
        (lambda: mb.ProjectedExperts(mb.MLPExperts(2, 3, 4), 0), ValueError, "dim must be"),
        (
            lambda: mb.ProjectedExperts(mb.MLPExperts(2, 3, 4), 5, norm="rms"),
            TypeError,
            "norm must be None or an nn.Module|norm",
        ),
    ],
)
def test_structure_banks_reject_bad_arguments(build: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "bank", [mb.ConstantExperts(2, 4), mb.ProjectedExperts(mb.MLPExperts(2, 3, 4), 4)]
)
def test_structure_banks_reject_bad_rows(bank: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"grouped must have shape \[rows, 4\]"):
        bank(torch.randn(3, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"group_sizes must have shape \[2\]"):
        bank(torch.randn(3, 4), torch.tensor([3]))
