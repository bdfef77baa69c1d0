"""Expert banks: E feed-forward experts stored as stacked 3D weights.

Legend: R grouped rows, E experts, D model dim, F expert hidden dim.

A bank takes rows already grouped by expert (from a dispatcher) and the number of rows
of each expert, and returns one output row per input row. It knows nothing of routing,
so routers and banks combine freely. Experts with no rows get exactly zero gradient.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from moeblocks.grouped import grouped_mm

__all__ = ["ExpertBank", "GELUExperts", "SwiGLUExperts"]


@runtime_checkable
class ExpertBank(Protocol):
    """Runs each expert on its own contiguous rows."""

    num_experts: int
    dim: int

    def __call__(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """Apply expert ``e`` to its ``group_sizes[e]`` rows, in order."""
        ...


def _check_dims(num_experts: int, dim: int, hidden: int) -> None:
    for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _init_stacked(w: Tensor, fan_in: int) -> None:
    # Same scale as nn.Linear's default init, per expert.
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(w, -bound, bound)


class _StackedMLP(nn.Module):
    """Shared validation and repr of the banks; not public."""

    def __init__(self, num_experts: int, dim: int, hidden: int, backend: str) -> None:
        super().__init__()
        _check_dims(num_experts, dim, hidden)
        if backend not in ("auto", "torch", "loop"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'loop', got {backend!r}")
        self.num_experts = num_experts
        self.dim = dim
        self.hidden = hidden
        self.backend = backend

    def _check(self, grouped: Tensor, group_sizes: Tensor) -> None:
        if grouped.ndim != 2 or grouped.shape[1] != self.dim:
            raise ValueError(
                f"grouped must have shape [rows, {self.dim}], got {tuple(grouped.shape)}"
            )
        if group_sizes.shape != (self.num_experts,):
            raise ValueError(
                f"group_sizes must have shape [{self.num_experts}], got {tuple(group_sizes.shape)}"
            )

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
            f"backend={self.backend!r}"
        )


class SwiGLUExperts(_StackedMLP):
    """SwiGLU experts: ``(silu(x W_gate) ⊙ x W_up) W_out`` per expert, no biases.

    The gate and up projections are stored side by side in ``w_in_EDF2`` (``[E, D, 2F]``)
    so each expert runs one input matmul.

    Args:
        num_experts: Number of experts E.
        dim: Model dimension D.
        hidden: Expert hidden dimension F.
        backend: Grouped-matmul backend, see :func:`moeblocks.grouped.grouped_mm`.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, backend: str = "auto") -> None:
        super().__init__(num_experts, dim, hidden, backend)
        self.w_in_EDF2 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        _init_stacked(self.w_in_EDF2, dim)
        _init_stacked(self.w_out_EFD, hidden)

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """Run every expert on its rows."""
        self._check(grouped, group_sizes)
        h_RF2 = grouped_mm(grouped, self.w_in_EDF2, group_sizes, self.backend)
        gate_RF, up_RF = h_RF2.chunk(2, dim=-1)
        return grouped_mm(F.silu(gate_RF) * up_RF, self.w_out_EFD, group_sizes, self.backend)


class GELUExperts(_StackedMLP):
    """GELU experts: ``gelu(x W_in) W_out`` per expert, no biases.

    Args:
        num_experts: Number of experts E.
        dim: Model dimension D.
        hidden: Expert hidden dimension F.
        backend: Grouped-matmul backend, see :func:`moeblocks.grouped.grouped_mm`.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, backend: str = "auto") -> None:
        super().__init__(num_experts, dim, hidden, backend)
        self.w_in_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        _init_stacked(self.w_in_EDF, dim)
        _init_stacked(self.w_out_EFD, hidden)

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """Run every expert on its rows."""
        self._check(grouped, group_sizes)
        h_RF = grouped_mm(grouped, self.w_in_EDF, group_sizes, self.backend)
        return grouped_mm(F.gelu(h_RF), self.w_out_EFD, group_sizes, self.backend)
