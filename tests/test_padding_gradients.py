"""Gradients through padded expert segments, padding rows included, for both dispatchers.

Legend: T tokens, D dim, F hidden, E experts, K experts per token, N = T·K slots,
R grouped rows (N plus padding).

With ``pad_to > 1`` the dispatchers add padding rows to the grouped tensor. An expert
with biases writes non-zero values there (``act(b_in) W_out + b_out``) that ``unpermute``
never reads, so the gradient of every padding row must be exactly zero. A backward that
gave padding rows the weight of slot 0 (through a clamped slot index) changes neither the
token nor the combine-weight gradients, only the gradient of the grouped rows and, from
there, of ``b_out``; and nothing at all with ``pad_to=1``. So these tests take the
gradient of the WHOLE grouped tensor and of every expert parameter, against float64
references that never group tokens.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernels: Triton reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from reference import expert_token

import moeblocks as mb

# Float64 throughout: the references sum the same terms in another order (dot products
# over D and F, K copies per token), which moves results by a few ulp of float64 only. A
# padding row with slot 0's weight moves b_out's gradient by O(1).
TOL = {"rtol": 1e-10, "atol": 1e-12}
T, E, K, D, F = 7, 3, 2, 5, 4
# Counts [5, 5, 4]: with pad_to 3 or 8 every expert gets padding rows.
EXPERTS_TK = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1], [1, 2], [0, 2], [0, 1]])


def _dispatcher(name: str, pad_to: int) -> mb.TorchDispatcher:
    if name == "torch":
        return mb.TorchDispatcher(pad_to=pad_to)
    pytest.importorskip("triton")
    from moeblocks.triton_dispatch import TritonDispatcher

    return TritonDispatcher(pad_to=pad_to)


def _device(name: str) -> str:
    # The Triton dispatcher runs compiled on a GPU, else in the interpreter on CPU.
    return "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"


def _routing(weights_TK: torch.Tensor) -> mb.Routing:
    zeros_TE = torch.zeros(T, E, device=weights_TK.device)
    return mb.Routing(zeros_TE, zeros_TE, EXPERTS_TK.to(weights_TK.device), weights_TK)


@pytest.mark.parametrize("pad_to", [3, 8])
@pytest.mark.parametrize("weights_grad", [True, False], ids=["fused", "rows_only"])
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_unpermute_gradient_of_every_grouped_row(
    name: str, weights_grad: bool, pad_to: int
) -> None:
    # Without a weight gradient the Triton backward runs a weighted permute, not the
    # fused kernel: both must zero the padding rows.
    device = _device(name)
    gen = torch.Generator().manual_seed(pad_to)
    w_TK = (torch.rand(T, K, generator=gen, dtype=torch.float64) + 0.1).to(device)
    d = _dispatcher(name, pad_to)
    _, layout = d.permute(torch.zeros(T, D, dtype=torch.float64, device=device), _routing(w_TK))
    padding_R = layout.slot_of_row < 0
    assert bool(padding_R.any()), "the case must have padding rows"
    # Non-zero everywhere, padding rows included, as a biased expert's output.
    y_RD = torch.randn(layout.num_rows, D, generator=gen, dtype=torch.float64).to(device)
    g_TD = torch.randn(T, D, generator=gen, dtype=torch.float64).to(device)
    y, w = y_RD.clone().requires_grad_(), w_TK.clone().requires_grad_(weights_grad)
    (d.unpermute(y, layout, w) * g_TD).sum().backward()

    # The reference reads one row per slot through the layout and never touches the rest.
    y_ref, w_ref = y_RD.clone().requires_grad_(), w_TK.clone().requires_grad_()
    rows_TK = layout.row_of_slot.view(T, K).tolist()
    out_ref = torch.stack(
        [sum(w_ref[t, j] * y_ref[rows_TK[t][j]] for j in range(K)) for t in range(T)]
    )
    (out_ref * g_TD).sum().backward()

    assert bool((y.grad[padding_R] == 0).all()), "padding rows must get no gradient"
    # grad_y[row(t, j)] = w[t, j] · g[t] is one product: exact in float64.
    assert torch.equal(y.grad, y_ref.grad)
    if weights_grad:
        torch.testing.assert_close(w.grad, w_ref.grad, **TOL)


@pytest.mark.parametrize("pad_to", [1, 8])
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_biased_experts_gradients_match_a_token_loop(name: str, pad_to: int) -> None:
    device = _device(name)
    torch.manual_seed(pad_to)
    bank = mb.MLPExperts(E, D, F, activation="gelu", bias=True).double().to(device)
    with torch.no_grad():
        for p in bank.parameters():  # biases start at zero: make them count
            p.copy_(torch.randn_like(p))
    x_TD = torch.randn(T, D, dtype=torch.float64, device=device)
    w_TK = torch.rand(T, K, dtype=torch.float64, device=device) + 0.1
    g_TD = torch.randn(T, D, dtype=torch.float64, device=device)

    x, w = x_TD.clone().requires_grad_(), w_TK.clone().requires_grad_()
    d = _dispatcher(name, pad_to)
    grouped, layout = d.permute(x, _routing(w.detach()))
    (d.unpermute(bank(grouped, layout.group_sizes), layout, w) * g_TD).sum().backward()
    got = {"x": x.grad, "w": w.grad, **{n: p.grad for n, p in bank.named_parameters()}}

    bank.zero_grad()
    x, w = x_TD.clone().requires_grad_(), w_TK.clone().requires_grad_()
    experts_TK = EXPERTS_TK.tolist()
    out_ref = torch.stack(
        [
            sum(w[t, j] * expert_token(bank, experts_TK[t][j], x[t]) for j in range(K))
            for t in range(T)
        ]
    )
    (out_ref * g_TD).sum().backward()
    want = {"x": x.grad, "w": w.grad, **{n: p.grad for n, p in bank.named_parameters()}}
    assert set(got) == {"x", "w", "w_in_EDF", "w_out_EFD", "b_in_EF", "b_out_ED"}
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("pad_to", [1, 3, 8])
def test_segments_are_padded_to_the_next_multiple_only(pad_to: int) -> None:
    # Counts [5, 5, 4] plus an empty expert: each segment is the smallest multiple of
    # pad_to that holds its rows (an empty expert gets none), so padding costs at most
    # pad_to - 1 rows per expert.
    layout = mb.build_layout(EXPERTS_TK, E + 1, pad_to=pad_to)
    want = [-(-c // pad_to) * pad_to for c in (5, 5, 4, 0)]
    assert layout.counts.tolist() == [5, 5, 4, 0]
    assert layout.group_sizes.tolist() == want
    assert layout.num_rows == sum(want)
