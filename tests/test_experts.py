"""Expert banks: grouped backends against the loop, and zero-token experts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.grouped import grouped_mm, torch_grouped_mm_supported


def random_sizes(draw: st.DrawFn, num_experts: int) -> torch.Tensor:
    sizes = draw(
        st.lists(st.sampled_from([0, 0, 1, 3, 8, 17]), min_size=num_experts, max_size=num_experts)
    )
    return torch.tensor(sizes, dtype=torch.long)


@given(st.data())
def test_grouped_backends_agree(data: st.DataObject) -> None:
    num_experts = data.draw(st.integers(1, 12))
    sizes_E = random_sizes(data.draw, num_experts)
    # Multiples of 4 so that torch._grouped_mm's 16-byte alignment holds for float32.
    dim = data.draw(st.sampled_from([4, 8, 20, 64]))
    hidden = data.draw(st.sampled_from([4, 12, 32]))
    cls = data.draw(st.sampled_from([mb.SwiGLUExperts, mb.GELUExperts]))
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    loop = cls(num_experts, dim, hidden, backend="loop")
    fused = cls(num_experts, dim, hidden, backend="torch")
    fused.load_state_dict(loop.state_dict())
    x = torch.randn(int(sizes_E.sum()), dim)
    x_loop, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_loop, y_fused = loop(x_loop, sizes_E), fused(x_fused, sizes_E)
    # Same float32 products, different blocking of the dot products: a few ulps apart.
    torch.testing.assert_close(y_fused, y_loop, rtol=1e-5, atol=1e-5)
    y_loop.sum().backward()
    y_fused.sum().backward()
    torch.testing.assert_close(x_fused.grad, x_loop.grad, rtol=1e-5, atol=1e-5)
    for p_loop, p_fused in zip(loop.parameters(), fused.parameters(), strict=False):
        torch.testing.assert_close(p_fused.grad, p_loop.grad, rtol=1e-5, atol=1e-5)
        empty = sizes_E == 0
        # Experts with no rows get exactly zero gradient.
        assert torch.count_nonzero(p_loop.grad[empty]) == 0
        assert torch.count_nonzero(p_fused.grad[empty]) == 0


def test_grouped_mm_against_per_expert_matmul() -> None:
    torch.manual_seed(0)
    sizes = torch.tensor([2, 0, 5, 1])
    x = torch.randn(8, 4)
    w = torch.randn(4, 4, 8)
    expected = torch.cat([x[0:2] @ w[0], x[2:7] @ w[2], x[7:8] @ w[3]])
    for backend in ("loop", "torch", "auto"):
        torch.testing.assert_close(grouped_mm(x, w, sizes, backend=backend), expected)


def test_torch_backend_refuses_unsupported_operands() -> None:
    x, w = torch.randn(3, 5), torch.randn(2, 5, 3)  # rows of 20 / 12 bytes: not 16-aligned
    assert not torch_grouped_mm_supported(x, w)
    with pytest.raises(ValueError, match="backend='torch'"):
        grouped_mm(x, w, torch.tensor([1, 2]), backend="torch")
    bank = mb.SwiGLUExperts(2, 5, 3, backend="torch")
    with pytest.raises(ValueError, match="backend='torch'"):
        bank(x, torch.tensor([1, 2]))
    # "auto" falls back to the loop only because this is its documented rule.
    assert bank.backend == "torch"
    assert mb.SwiGLUExperts(2, 5, 3)(x, torch.tensor([1, 2])).shape == (3, 5)


def test_half_precision_uses_loop_on_cpu() -> None:
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(2, 8, 8, dtype=torch.bfloat16)
    assert not torch_grouped_mm_supported(x, w)
    ref = torch.cat([x[:1].float() @ w[0].float(), x[1:].float() @ w[1].float()])
    # bf16 output rounding: 8 mantissa bits.
    torch.testing.assert_close(
        grouped_mm(x, w, torch.tensor([1, 3])).float(), ref, rtol=2e-2, atol=2e-2
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_experts": 0, "dim": 4, "hidden": 4}, "num_experts"),
        ({"num_experts": 2, "dim": -1, "hidden": 4}, "dim"),
        ({"num_experts": 2, "dim": 4, "hidden": 4, "backend": "cuda"}, "backend"),
    ],
)
def test_bank_arguments_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mb.GELUExperts(**kwargs)


def test_bank_input_shapes_are_validated() -> None:
    bank = mb.GELUExperts(3, 4, 8)
    with pytest.raises(ValueError, match=r"grouped must have shape \[rows, 4\]"):
        bank(torch.randn(2, 5), torch.tensor([1, 1, 0]))
    with pytest.raises(ValueError, match=r"group_sizes must have shape \[3\]"):
        bank(torch.randn(2, 4), torch.tensor([2]))
