"""Expert banks: E feed-forward experts stored as stacked 3D weights.

Legend: R grouped rows, E experts, D model dim, F expert hidden dim.

A bank takes rows already grouped by expert (from a dispatcher) and the number of rows
of each expert, and returns one output row per input row. It knows nothing of routing,
so routers and banks combine freely. Experts with no rows get exactly zero gradient.

A bank checks its inputs: the shapes, dtype and device of ``grouped`` and ``group_sizes``
always; that the group sizes are >= 0 and sum to the rows (a host read) on CPU tensors
and in the ``"loop"`` backend always, on GPU tensors with ``sync_checks=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from moeblocks._checks import check_float, check_index, check_same_device, value_checks
from moeblocks.activations import GLU, GatedActivation, activation_fn
from moeblocks.grouped import grouped_mm, resolve_backend

__all__ = [
    "ExpertBank",
    "ExpertInit",
    "GELUExperts",
    "MLPExperts",
    "NormedExperts",
    "ScaledExperts",
    "SwiGLUExperts",
]


@runtime_checkable
class ExpertBank(Protocol):
    """Runs each expert on its own contiguous rows."""

    num_experts: int
    """Number of experts E (entries of ``group_sizes``)."""
    dim: int
    """Model dimension D of the rows in and out."""

    def __call__(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """Apply expert ``e`` to its ``group_sizes[e]`` rows, in order."""
        ...


def _check_dims(num_experts: int, dim: int, hidden: int) -> None:
    for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class ExpertInit:
    """How an expert bank initialises its weights (biases always start at zero).

    Args:
        std: Normal std of every weight (0.02 in GPT-2-style recipes and SRA's paper
            code); None keeps ``nn.Linear``'s default, uniform in ``±1/sqrt(fan_in)``.
        out_scale: Multiplies the std (or bound) of the output projection only; the
            "scaled output init" of GPT-2 and Megatron is ``1 / sqrt(2 · num_layers)``.
    """

    std: float | None = None
    out_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.std is not None and not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"std must be None or a finite number > 0, got {self.std!r}")
        if not (math.isfinite(self.out_scale) and self.out_scale > 0):
            raise ValueError(f"out_scale must be a finite number > 0, got {self.out_scale!r}")

    def apply(self, w: Tensor, fan_in: int, output: bool = False) -> None:
        """Initialise one stacked weight ``[E, fan_in, fan_out]`` in place."""
        scale = self.out_scale if output else 1.0
        with torch.no_grad():
            if self.std is None:
                bound = scale / math.sqrt(fan_in)  # nn.Linear's default scale, per expert
                nn.init.uniform_(w, -bound, bound)
            else:
                nn.init.normal_(w, 0.0, self.std * scale)


def _add_row_bias(h_RO: Tensor, b_EO: Tensor | None, group_sizes_E: Tensor) -> Tensor:
    if b_EO is None:
        return h_RO
    E, R = b_EO.shape[0], h_RO.shape[0]
    # output_size keeps repeat_interleave free of a host sync.
    expert_of_row_R = torch.repeat_interleave(
        torch.arange(E, device=h_RO.device), group_sizes_E, output_size=R
    )
    return h_RO + b_EO.to(h_RO.dtype).index_select(0, expert_of_row_R)


class _StackedMLP(nn.Module):
    """Shared validation, biases and repr of the banks; not public."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        backend: str,
        bias: bool,
        init: ExpertInit | None,
        w_in_name: str,
        b_in_name: str,
        in_width: int,
        sync_checks: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_dims(num_experts, dim, hidden)
        if isinstance(dropout, bool) or not (
            isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0
        ):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if backend not in ("auto", "torch", "loop"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'loop', got {backend!r}")
        init = ExpertInit() if init is None else init
        if not isinstance(init, ExpertInit):
            raise TypeError(f"init must be an ExpertInit, got {type(init).__name__}")
        self.num_experts = num_experts
        self.dim = dim
        self.hidden = hidden
        self.backend = backend
        self.init = init
        self.sync_checks = bool(sync_checks)
        self.dropout = float(dropout)
        # Registered by name so each bank keeps its shape-lettered attribute names.
        self.register_parameter(w_in_name, nn.Parameter(torch.empty(num_experts, dim, in_width)))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim))
        b_in = nn.Parameter(torch.empty(num_experts, in_width)) if bias else None
        self.register_parameter(b_in_name, b_in)
        self.b_out_ED = nn.Parameter(torch.empty(num_experts, dim)) if bias else None
        self._w_in_name = w_in_name
        self._b_in_name = b_in_name
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the weights by ``self.init`` and zero the biases, in place."""
        self.init.apply(getattr(self, self._w_in_name), self.dim)
        self.init.apply(self.w_out_EFD, self.hidden, output=True)
        with torch.no_grad():
            for b in (getattr(self, self._b_in_name), self.b_out_ED):
                if b is not None:
                    b.zero_()

    def _check(self, grouped: Tensor, group_sizes: Tensor) -> None:
        check_float(grouped, "grouped")
        check_index(group_sizes, "group_sizes")
        if grouped.ndim != 2 or grouped.shape[1] != self.dim:
            raise ValueError(
                f"grouped must have shape [rows, {self.dim}], got {tuple(grouped.shape)}"
            )
        if group_sizes.shape != (self.num_experts,):
            raise ValueError(
                f"group_sizes must have shape [{self.num_experts}], got {tuple(group_sizes.shape)}"
            )
        w_out = self.w_out_EFD
        if grouped.dtype != w_out.dtype:
            raise TypeError(
                f"grouped has dtype {grouped.dtype} but the expert weights are {w_out.dtype}"
            )
        check_same_device(grouped, "grouped", w_out, "the expert weights")
        check_same_device(group_sizes, "group_sizes", grouped, "grouped")
        if value_checks(group_sizes, self.sync_checks):
            R = grouped.shape[0]
            sizes = group_sizes.long()
            if bool((sizes.min() < 0) | (sizes.sum() != R)):  # host sync on a GPU
                raise ValueError(
                    f"group_sizes must be >= 0 and sum to the {R} rows of grouped, got "
                    f"values in [{int(sizes.min())}, {int(sizes.max())}] summing to "
                    f"{int(sizes.sum())}"
                )

    def _loop_sizes(self, grouped: Tensor, w: Tensor, group_sizes: Tensor) -> list[int] | None:
        """``group_sizes`` on the host, read once per forward when the loop backend runs.

        Both projections reuse the list, so a GPU forward on the loop backend (A100, or
        non-bf16 on H100) syncs once instead of once per grouped matmul; the torch
        backend reads nothing back (None).
        """
        loop = resolve_backend(grouped, w, self.backend) == "loop"
        return group_sizes.tolist() if loop else None  # the one host sync of the loop path

    def _project_in(
        self, w_in: Tensor, grouped: Tensor, group_sizes: Tensor
    ) -> tuple[Tensor, list[int] | None]:
        self._check(grouped, group_sizes)
        # grouped_mm repeats the value check on CPU (cheap); on a GPU it runs without
        # sync_checks, so the bank's check above and the sizes read here are the only syncs.
        sizes = self._loop_sizes(grouped, w_in, group_sizes)
        h = grouped_mm(grouped, w_in, group_sizes, self.backend, host_sizes=sizes)
        return _add_row_bias(h, getattr(self, self._b_in_name), group_sizes), sizes

    def _project_out(self, h: Tensor, group_sizes: Tensor, sizes: list[int] | None) -> Tensor:
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        out = grouped_mm(h, self.w_out_EFD, group_sizes, self.backend, host_sizes=sizes)
        return _add_row_bias(out, self.b_out_ED, group_sizes)

    @property
    def has_bias(self) -> bool:
        """Whether the bank has input and output biases."""
        return self.b_out_ED is not None

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, "
            f"backend={self.backend!r}, bias={self.has_bias}"
            + (f", dropout={self.dropout}" if self.dropout else "")
        )


class SwiGLUExperts(_StackedMLP):
    """Gated (GLU) experts: ``(act(x W_gate + b_gate) ⊙ (x W_up + b_up)) W_out + b_out``.

    The gate and up projections are stored side by side in ``w_in_EDF2`` (``[E, D, 2F]``,
    gate first) so each expert runs one input matmul. The default activation is SwiGLU;
    :class:`~moeblocks.activations.ClampedSwiGLU` gives GPT-OSS's experts.

    Args:
        num_experts: Number of experts E.
        dim: Model dimension D.
        hidden: Expert hidden dimension F.
        backend: Grouped-matmul backend, see :func:`moeblocks.grouped.grouped_mm`.
        activation: A :class:`~moeblocks.activations.GatedActivation`
            (default ``GLU("silu")``, i.e. SwiGLU).
        bias: Learnable biases ``b_in_EF2`` (``[E, 2F]``) and ``b_out_ED`` (``[E, D]``).
        init: Weight initialisation (default: ``nn.Linear``'s scale per expert).
        dropout: Dropout on the hidden units in training (as the official SRA experts).
        sync_checks: Also check that the group sizes of GPU tensors are >= 0 and sum to
            the rows, at one device sync per call (CPU tensors are always checked).
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        backend: str = "auto",
        *,
        activation: GatedActivation | None = None,
        bias: bool = False,
        init: ExpertInit | None = None,
        dropout: float = 0.0,
        sync_checks: bool = False,
    ) -> None:
        super().__init__(
            num_experts,
            dim,
            hidden,
            backend,
            bias,
            init,
            "w_in_EDF2",
            "b_in_EF2",
            2 * hidden,
            sync_checks,
            dropout,
        )
        activation = GLU() if activation is None else activation
        if not isinstance(activation, GatedActivation):
            raise TypeError(
                f"activation must be a gated activation (gate, up) -> hidden, "
                f"got {type(activation).__name__}"
            )
        self.activation = activation

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """Run every expert on its rows."""
        h_RF2, sizes = self._project_in(self.w_in_EDF2, grouped, group_sizes)
        gate_RF, up_RF = h_RF2.chunk(2, dim=-1)
        return self._project_out(self.activation(gate_RF, up_RF), group_sizes, sizes)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"{super().extra_repr()}, activation={self.activation}"


class MLPExperts(_StackedMLP):
    """Two-matrix experts: ``act(x W_in + b_in) W_out + b_out`` per expert.

    Args:
        num_experts: Number of experts E.
        dim: Model dimension D.
        hidden: Expert hidden dimension F.
        backend: Grouped-matmul backend, see :func:`moeblocks.grouped.grouped_mm`.
        activation: ``"gelu"`` (exact), ``"gelu_tanh"``, ``"relu"`` (Switch) or ``"silu"``.
        bias: Learnable biases ``b_in_EF`` (``[E, F]``) and ``b_out_ED`` (``[E, D]``).
        init: Weight initialisation (default: ``nn.Linear``'s scale per expert).
        dropout: Dropout on the hidden units in training (as the official SRA experts).
        sync_checks: Also check that the group sizes of GPU tensors are >= 0 and sum to
            the rows, at one device sync per call (CPU tensors are always checked).
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        backend: str = "auto",
        *,
        activation: str = "gelu",
        bias: bool = False,
        init: ExpertInit | None = None,
        dropout: float = 0.0,
        sync_checks: bool = False,
    ) -> None:
        activation_fn(activation)
        super().__init__(
            num_experts,
            dim,
            hidden,
            backend,
            bias,
            init,
            "w_in_EDF",
            "b_in_EF",
            hidden,
            sync_checks,
            dropout,
        )
        self.activation = activation

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """Run every expert on its rows."""
        h_RF, sizes = self._project_in(self.w_in_EDF, grouped, group_sizes)
        return self._project_out(activation_fn(self.activation)(h_RF), group_sizes, sizes)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"{super().extra_repr()}, activation={self.activation!r}"


class GELUExperts(MLPExperts):
    """:class:`MLPExperts` with a GELU (``"gelu"`` exact by default, or ``"gelu_tanh"``)."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        backend: str = "auto",
        *,
        activation: str = "gelu",
        bias: bool = False,
        init: ExpertInit | None = None,
        dropout: float = 0.0,
        sync_checks: bool = False,
    ) -> None:
        if activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"GELUExperts takes 'gelu' or 'gelu_tanh', got {activation!r}")
        super().__init__(
            num_experts,
            dim,
            hidden,
            backend,
            activation=activation,
            bias=bias,
            init=init,
            dropout=dropout,
            sync_checks=sync_checks,
        )


def _check_bank(experts: object) -> None:
    if not isinstance(experts, nn.Module) or not isinstance(experts, ExpertBank):
        raise TypeError(f"experts must be an nn.Module expert bank, got {type(experts).__name__}")


class NormedExperts(nn.Module):
    """A bank with a norm on every row going in and/or coming out.

    ``out_r = output_norm(bank(input_norm(x_r)))``, a norm acting on each row alone. On a
    one-expert bank inside :class:`~moeblocks.SharedExperts` the pair makes a branch
    ``norm → expert → norm`` (Gemma-4's dense branch). For routed experts the input norm
    runs once per routed copy; ``MoELayer(routed_input_norm=)`` normalises each token
    once, which is what a float32 norm in a float64 model must do to round as a model
    that normalises before routing.

    Args:
        experts: The wrapped bank (its parameters stay under ``experts.``).
        input_norm: A module applied to the rows going in, or None.
        output_norm: A module applied to the rows coming out, or None.
    """

    def __init__(
        self,
        experts: ExpertBank,
        input_norm: nn.Module | None = None,
        output_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        _check_bank(experts)
        for name, norm in (("input_norm", input_norm), ("output_norm", output_norm)):
            if norm is not None and not isinstance(norm, nn.Module):
                raise TypeError(f"{name} must be None or an nn.Module, got {type(norm).__name__}")
        self.experts = experts
        self.input_norm = input_norm
        self.output_norm = output_norm

    @property
    def num_experts(self) -> int:
        """Number of experts E."""
        return self.experts.num_experts

    @property
    def dim(self) -> int:
        """Model dimension D."""
        return self.experts.dim

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """The wrapped bank on the normalised rows, its output normalised."""
        if self.input_norm is not None:
            grouped = self.input_norm(grouped)
        out = self.experts(grouped, group_sizes)
        return out if self.output_norm is None else self.output_norm(out)


class ScaledExperts(nn.Module):
    """A bank whose expert ``e`` multiplies its output by a learnable ``scale_E[e]``.

    The same as multiplying the combine weight of every slot routed to ``e`` by
    ``scale_E[e]`` (Gemma-4's ``per_expert_scale``, applied after the top-k weights are
    renormalised); the router's record keeps the weights before the scale.

    Args:
        experts: The wrapped bank (its parameters stay under ``experts.``).
    """

    def __init__(self, experts: ExpertBank) -> None:
        super().__init__()
        _check_bank(experts)
        self.experts = experts
        self.scale_E = nn.Parameter(torch.empty(experts.num_experts))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Set every scale to 1, in place."""
        self.scale_E.fill_(1.0)

    @property
    def num_experts(self) -> int:
        """Number of experts E."""
        return self.experts.num_experts

    @property
    def dim(self) -> int:
        """Model dimension D."""
        return self.experts.dim

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """The wrapped bank's rows, each times its expert's scale."""
        out = self.experts(grouped, group_sizes)
        # output_size: no host read of the sizes (they sum to R, checked by the bank).
        scale_R = torch.repeat_interleave(
            self.scale_E.to(out.dtype), group_sizes, output_size=out.shape[0]
        )
        return out * scale_R.unsqueeze(1)
