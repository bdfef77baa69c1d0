"""Parameter-free experts (IdentityExperts, ZeroExperts) and ConcatExperts.

A float64 per-token reference written from the formula (``Σ_j w_j · f_{e_j}(x)`` with
``f`` a SwiGLU expert, the identity or zero) for a layer whose bank is FFN experts beside
identity and zero experts, outputs and every gradient, over hypothesis-drawn shapes
(T = 0, experts with no token); the bank against its parts; the argument checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb


def _expert(bank: mb.ConcatExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of a (SwiGLU, identity, zero) bank on one token, from the formula."""
    ffn, identity, _ = bank.banks
    if e < ffn.num_experts:
        gate, up = (x @ ffn.w_in_EDF2[e]).chunk(2)
        return (F.silu(gate) * up) @ ffn.w_out_EFD[e]
    if e < ffn.num_experts + identity.num_experts:
        return x
    return torch.zeros_like(x)


def _grads(x: torch.Tensor, layer: torch.nn.Module) -> list[torch.Tensor]:
    """The gradients of x and of every parameter, zeros where none flowed (a copy)."""
    return [
        torch.zeros_like(t) if t.grad is None else t.grad.clone() for t in [x, *layer.parameters()]
    ]


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 6),
    E=st.integers(1, 4),
    Z=st.integers(1, 3),
    Y=st.integers(1, 2),
    K=st.integers(1, 3),
    D=st.integers(1, 5),
    hidden=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_a_layer_with_parameter_free_experts_matches_a_token_loop(
    T: int, E: int, Z: int, Y: int, K: int, D: int, hidden: int, seed: int
) -> None:
    torch.manual_seed(seed)
    bank = mb.ConcatExperts(
        mb.SwiGLUExperts(E, D, hidden), mb.IdentityExperts(Z, D), mb.ZeroExperts(Y, D)
    ).double()
    n = E + Z + Y
    router = mb.Router(mb.LinearScorer(D, n), min(K, n), weights=mb.WeightPolicy("never"))
    layer = mb.MoELayer(router.double(), mb.TorchDispatcher(), bank)
    x = (torch.randn(T, D, dtype=torch.float64) * 2).requires_grad_()
    res = layer(x)
    g = torch.randn(T, D, dtype=torch.float64)
    (res.out * g).sum().backward()
    got = _grads(x, layer)

    x_ref = x.detach().clone().requires_grad_()
    layer.zero_grad()
    ref = layer.router(x_ref)  # the same decision, in a graph of its own
    assert torch.equal(ref.experts, res.routing.experts)
    rows = []
    for t in range(T):
        row = torch.zeros(D, dtype=torch.float64)
        for j in range(res.routing.experts.shape[1]):
            e = int(ref.experts[t, j])
            row = row + ref.weights[t, j] * _expert(bank, e, x_ref[t])
        rows.append(row)
    expected = torch.stack(rows) if rows else torch.zeros(0, D, dtype=torch.float64)
    if T:
        (expected * g).sum().backward()
    # float64, a handful of terms summed in another order.
    torch.testing.assert_close(res.out.detach(), expected.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(got, _grads(x_ref, layer), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_bank_runs_each_part_on_its_rows() -> None:
    torch.manual_seed(0)
    ffn = mb.SwiGLUExperts(2, 4, 3)
    bank = mb.ConcatExperts(ffn, mb.IdentityExperts(2, 4), mb.ZeroExperts(1, 4))
    assert (bank.num_experts, bank.dim) == (5, 4)
    grouped = torch.randn(9, 4)
    sizes = torch.tensor([3, 0, 2, 3, 1])
    out = bank(grouped, sizes)
    assert torch.equal(out[:3], ffn(grouped[:3], torch.tensor([3, 0])))
    assert torch.equal(out[3:8], grouped[3:8])
    assert torch.equal(out[8:], torch.zeros(1, 4))
    out.sum().backward()
    assert torch.all(ffn.w_in_EDF2.grad[1] == 0)  # the FFN expert with no rows
    assert not list(mb.IdentityExperts(2, 4).parameters())


def test_zero_experts_give_zeros_even_for_nan_rows() -> None:
    out = mb.ZeroExperts(1, 3)(torch.full((2, 3), float("nan")), torch.tensor([2]))
    assert torch.equal(out, torch.zeros(2, 3))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: mb.ConcatExperts(), ValueError, "at least one expert bank"),
        (
            lambda: mb.ConcatExperts(mb.IdentityExperts(1, 3), mb.IdentityExperts(1, 4)),
            ValueError,
            "share one dim",
        ),
        (lambda: mb.IdentityExperts(0, 3), ValueError, "num_experts must be an int >= 1"),
        (lambda: mb.ZeroExperts(1, 0), ValueError, "dim must be an int >= 1"),
    ],
)
def test_bad_arguments(make, error: type, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("bank", "sizes", "match"),
    [
        (mb.IdentityExperts(2, 3), torch.tensor([1, 1, 0]), r"group_sizes must have shape \[2\]"),
        (mb.IdentityExperts(2, 3), torch.tensor([1, 2]), "sum to the 2 rows"),
        (mb.ZeroExperts(2, 3), torch.tensor([-1, 3]), "must be >= 0"),
        (
            mb.ConcatExperts(mb.IdentityExperts(1, 3), mb.ZeroExperts(1, 3)),
            torch.tensor([2, 1]),
            "sum to the 2 rows",
        ),
    ],
)
def test_bad_group_sizes(bank: torch.nn.Module, sizes: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bank(torch.zeros(2, 3), sizes)
