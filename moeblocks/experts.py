"""Expert banks: E feed-forward experts stored as stacked 3D weights.

Legend: R grouped rows, E experts, D model dim, F expert hidden dim.

A bank takes rows already grouped by expert (from a dispatcher) and the number of rows
of each expert, and returns one output row per input row. It knows nothing of routing,
so routers and banks combine freely. Experts with no rows get exactly zero gradient.
Parameter-free experts (:class:`IdentityExperts`, :class:`ZeroExperts`) sit beside FFN
experts through :class:`ConcatExperts` (LongCat-Flash's zero-computation experts).

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
    "ConcatExperts",
    "ConstantExperts",
    "ConstantScaledExperts",
    "ExpertBank",
    "ExpertInit",
    "GELUExperts",
    "IdentityExperts",
    "LinearExperts",
    "MLPExperts",
    "NormedExperts",
    "ScaledExperts",
    "SwiGLUExperts",
    "ZeroExperts",
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
        _check_row_shapes(grouped, group_sizes, self.dim, self.num_experts)
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


# --- parameter-free experts, and banks side by side -------------------------------------


def _check_row_shapes(grouped: Tensor, group_sizes: Tensor, dim: int, num_experts: int) -> None:
    """The dtypes and shapes of a bank's input ``grouped`` [R, D] and ``group_sizes`` [E]."""
    check_float(grouped, "grouped")
    check_index(group_sizes, "group_sizes")
    if grouped.ndim != 2 or grouped.shape[1] != dim:
        raise ValueError(f"grouped must have shape [rows, {dim}], got {tuple(grouped.shape)}")
    if group_sizes.shape != (num_experts,):
        raise ValueError(
            f"group_sizes must have shape [{num_experts}], got {tuple(group_sizes.shape)}"
        )


def _check_rows(
    grouped: Tensor, group_sizes: Tensor, num_experts: int, dim: int, sync_checks: bool
) -> None:
    """The bank input checks of :class:`_StackedMLP`, for banks without weights."""
    _check_row_shapes(grouped, group_sizes, dim, num_experts)
    check_same_device(group_sizes, "group_sizes", grouped, "grouped")
    if value_checks(group_sizes, sync_checks):
        R, sizes = grouped.shape[0], group_sizes.long()
        if bool((sizes.min() < 0) | (sizes.sum() != R)):  # host sync on a GPU
            raise ValueError(
                f"group_sizes must be >= 0 and sum to the {R} rows of grouped, got {sizes.tolist()}"
            )


class _ParameterFree(nn.Module):
    """Shared arguments and checks of the parameter-free banks; not public."""

    def __init__(self, num_experts: int, dim: int, sync_checks: bool = False) -> None:
        super().__init__()
        _check_dims(num_experts, dim, 1)
        self.num_experts = num_experts
        self.dim = dim
        self.sync_checks = bool(sync_checks)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"num_experts={self.num_experts}, dim={self.dim}"


class IdentityExperts(_ParameterFree):
    """Experts that return their input: a token routed to one gets ``weight · x``.

    LongCat-Flash's zero-computation experts: a router that picks one spends no compute
    on that slot. No parameters.

    Args:
        num_experts: Number of experts E.
        dim: Model dimension D.
        sync_checks: Also check the group sizes of GPU tensors (one device sync).
    """

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """The rows, unchanged."""
        _check_rows(grouped, group_sizes, self.num_experts, self.dim, self.sync_checks)
        return grouped


class ZeroExperts(_ParameterFree):
    """Experts that return zeros: a token routed to one gets nothing from that slot.

    A "skip" expert: its routing weight still counts in a renormalisation, but it adds
    nothing (exact zeros, whatever the input). No parameters.

    Args:
        num_experts: Number of experts E.
        dim: Model dimension D.
        sync_checks: Also check the group sizes of GPU tensors (one device sync).
    """

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """Zeros shaped like the rows."""
        _check_rows(grouped, group_sizes, self.num_experts, self.dim, self.sync_checks)
        return torch.zeros_like(grouped)


class ConcatExperts(nn.Module):
    """Expert banks side by side as one bank: the first bank's experts, then the next's.

    With banks of E₁, E₂, … experts, expert ids ``0 … E₁−1`` are the first bank's,
    ``E₁ … E₁+E₂−1`` the second's, and so on (``ConcatExperts(SwiGLUExperts(E, D, F),
    IdentityExperts(Z, D))`` is LongCat-Flash's bank). Each bank runs on its own
    contiguous rows. Splitting the rows reads the per-bank row counts on the host: one
    device sync per call on a GPU. No parameters of its own.

    Args:
        *banks: Expert banks of one model dimension D.
    """

    def __init__(self, *banks: ExpertBank) -> None:
        super().__init__()
        if not banks:
            raise ValueError("ConcatExperts needs at least one expert bank, got none")
        for i, bank in enumerate(banks):
            if not isinstance(bank, nn.Module) or not isinstance(bank, ExpertBank):
                raise TypeError(
                    f"banks[{i}] must be an nn.Module expert bank, got {type(bank).__name__}"
                )
        dims = [bank.dim for bank in banks]
        if len(set(dims)) != 1:
            raise ValueError(f"the banks must share one dim, got dims {dims}")
        self.banks = nn.ModuleList(banks)
        self.dim = dims[0]
        self.num_experts = sum(bank.num_experts for bank in banks)

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """Run every bank on its experts' rows and stack the results in row order."""
        check_float(grouped, "grouped", 2)
        check_index(group_sizes, "group_sizes")
        if group_sizes.shape != (self.num_experts,):
            raise ValueError(
                f"group_sizes must have shape [{self.num_experts}], got {tuple(group_sizes.shape)}"
            )
        sizes_per_bank = group_sizes.split([bank.num_experts for bank in self.banks])
        rows = torch.stack([s.sum() for s in sizes_per_bank]).tolist()  # the host sync
        if sum(rows) != grouped.shape[0]:
            raise ValueError(
                f"group_sizes must sum to the {grouped.shape[0]} rows of grouped, got {sum(rows)}"
            )
        parts = grouped.split(rows)
        outs = [bank(x, s) for bank, x, s in zip(self.banks, parts, sizes_per_bank, strict=True)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"num_experts={self.num_experts}, dim={self.dim}"


class ScaledExperts(nn.Module):
    """Any expert bank, its output rows times a learnable scale: one scalar or one per expert.

    ``per_expert=False``: every row times one scalar ``scale`` (``[]``). Multiplying every
    expert's output by ``s`` is multiplying every combine weight by ``s``: a learnable
    global scale on the routing weights (Inkling's ``global_scale``).
    ``per_expert=True``: expert ``e``'s rows times ``scale[e]`` (``[E]``), the same as
    multiplying the combine weight of every slot routed to ``e`` by it (Gemma-4's
    ``per_expert_scale``, applied after the top-k weights are renormalised); the router's
    record keeps the weights before the scale.

    Args:
        bank: The expert bank (its parameters stay under ``bank.``).
        init: Initial value of every scale, finite.
        per_expert: One scale per expert instead of one for the bank.
    """

    def __init__(self, bank: ExpertBank, init: float = 1.0, *, per_expert: bool = False) -> None:
        super().__init__()
        if not isinstance(bank, nn.Module) or not isinstance(bank, ExpertBank):
            raise TypeError(f"bank must be an nn.Module expert bank, got {type(bank).__name__}")
        if isinstance(init, bool) or not (isinstance(init, (int, float)) and math.isfinite(init)):
            raise ValueError(f"init must be a finite number, got {init!r}")
        self.bank = bank
        self.init = float(init)
        self.per_expert = bool(per_expert)
        self.dim = bank.dim
        self.num_experts = bank.num_experts
        self.scale = nn.Parameter(torch.empty((bank.num_experts,) if per_expert else ()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Set ``scale`` to ``init``, in place."""
        self.scale.fill_(self.init)

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """``scale · bank(grouped, group_sizes)``, per row's expert with ``per_expert``."""
        out = self.bank(grouped, group_sizes)
        if not self.per_expert:
            return out * self.scale.to(out.dtype)
        # output_size: no host read of the sizes (they sum to R, checked by the bank).
        scale_R = torch.repeat_interleave(
            self.scale.to(out.dtype), group_sizes, output_size=out.shape[0]
        )
        return out * scale_R.unsqueeze(1)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"init={self.init}, per_expert={self.per_expert}"


class ConstantScaledExperts(nn.Module):
    """Any expert bank whose output rows are multiplied by a constant, in their dtype.

    ``out = scale · experts(grouped, group_sizes)``. This is a routed scaling factor that
    a model applies to the summed routed output after the experts, in the model dtype
    (Laguna, Step-3.7, MiniMax-M3, Beam): the combine is a weighted sum, so scaling each
    row is the same function, and unlike folding the factor into the combine weights
    (``WeightPolicy(scale=...)``, computed in the routing dtype, often float32) the
    product is rounded in the model dtype as the model rounds it.

    Args:
        experts: The wrapped bank (kept as ``self.experts``, with its parameters).
        scale: The factor, finite and > 0.
    """

    def __init__(self, experts: ExpertBank, scale: float) -> None:
        super().__init__()
        if not isinstance(experts, nn.Module) or not isinstance(experts, ExpertBank):
            raise TypeError(
                f"experts must be an nn.Module expert bank, got {type(experts).__name__}"
            )
        if isinstance(scale, bool) or not (
            isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0
        ):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.experts = experts
        self.scale = float(scale)

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
        """The wrapped bank's rows times ``scale``."""
        return self.experts(grouped, group_sizes) * self.scale

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"scale={self.scale}"


# --- banks around the stacked MLPs (issue 27: the layer structure of HF families) --------


def _expert_of_row(group_sizes_E: Tensor, rows: int) -> Tensor:
    E = group_sizes_E.shape[0]
    # output_size keeps repeat_interleave free of a host sync.
    arange_E = torch.arange(E, device=group_sizes_E.device)
    return torch.repeat_interleave(arange_E, group_sizes_E, output_size=rows)


class ConstantExperts(nn.Module):
    """Experts that ignore their input: expert ``e`` outputs its learnable vector ``c_e``.

    In a layer's shared slot, ``SharedExperts(ConstantExperts(1, dim))`` is a learnable
    bias added to the layer output (JetMoE's MoE block). The input gets no gradient
    through it; ``value_ED`` starts at zero.

    Args:
        num_experts: Number of experts E.
        dim: Model dimension D.
    """

    def __init__(self, num_experts: int, dim: int) -> None:
        super().__init__()
        _check_dims(num_experts, dim, 1)
        self.num_experts = num_experts
        self.dim = dim
        self.value_ED = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero every expert's output vector, in place."""
        self.value_ED.zero_()

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """``c_e`` on each of expert ``e``'s rows, in the rows' dtype."""
        _check_row_shapes(grouped, group_sizes, self.dim, self.num_experts)
        check_same_device(grouped, "grouped", self.value_ED, "the expert values")
        expert_R = _expert_of_row(group_sizes, grouped.shape[0])
        return self.value_ED.to(grouped.dtype).index_select(0, expert_R)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"num_experts={self.num_experts}, dim={self.dim}"


class NormedExperts(nn.Module):
    """A bank with a norm on every row coming out (before the combine) and/or going in.

    ``norm(bank(input_norm(rows)))``, each norm called as ``(rows [R, D], expert ids [R])
    -> [R, D]`` on each row alone. The output norm sees each routed copy's own output,
    before the layer weights and sums them (Ergo's and MuseSpark's experts); with a
    per-expert :class:`~moeblocks.norms.RMSNorm` (``num_experts=E``) each expert has its
    own scale. Around a one-expert bank in ``SharedExperts`` the pair makes a branch
    ``norm → expert → norm`` (Gemma-4's dense branch; Ergo's norm on the shared output).
    For routed experts the input norm runs once per routed copy;
    ``MoELayer(routed_input_norm=)`` normalises each token once, which is what a float32
    norm in a float64 model must do to round as a model that normalises before routing.

    Args:
        experts: The inner bank (its parameters stay under ``experts.``).
        norm: The norm on the rows coming out, e.g. :class:`~moeblocks.norms.RMSNorm`,
            or None.
        input_norm: The norm on the rows going in, or None.

    Raises:
        TypeError: If ``experts`` is no expert bank or a norm no module.
        ValueError: If both norms are None.
    """

    def __init__(
        self, experts: ExpertBank, norm: nn.Module | None, *, input_norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        if not isinstance(experts, nn.Module) or not isinstance(experts, ExpertBank):
            raise TypeError(
                f"experts must be an nn.Module expert bank, got {type(experts).__name__}"
            )
        for name, module in (("norm", norm), ("input_norm", input_norm)):
            if module is not None and not isinstance(module, nn.Module):
                raise TypeError(f"{name} must be None or an nn.Module, got {type(module).__name__}")
        if norm is None and input_norm is None:
            raise ValueError("NormedExperts needs norm, input_norm or both, got neither")
        self.experts = experts
        self.norm = norm
        self.input_norm = input_norm
        self.num_experts = experts.num_experts
        self.dim = experts.dim

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """Normalise the rows going in, run the inner bank, normalise the rows coming out."""
        _check_row_shapes(grouped, group_sizes, self.dim, self.num_experts)
        expert_R = _expert_of_row(group_sizes, grouped.shape[0])
        if self.input_norm is not None:
            grouped = self.input_norm(grouped, expert_R)
        out_RD = self.experts(grouped, group_sizes)
        return out_RD if self.norm is None else self.norm(out_RD, expert_R)


class LinearExperts(nn.Module):
    """Experts that are one linear map each: expert ``e`` maps a row ``x`` to ``x · W_e``.

    ``w_EDO`` is ``[E, D, O]``; the output width O may differ from the input width D, so
    this bank serves as the routed input or output projection of a mixture of attention
    heads (:class:`~moeblocks.routed_linear.RoutedLinear`, JetMoE); with ``O == D`` it is
    an expert bank for :class:`~moeblocks.MoELayer` too.

    Args:
        num_experts: Number of experts E.
        dim: Input width D of the rows.
        out_dim: Output width O.
        backend: Grouped-matmul backend, see :func:`moeblocks.grouped.grouped_mm`.
    """

    def __init__(self, num_experts: int, dim: int, out_dim: int, backend: str = "auto") -> None:
        super().__init__()
        _check_dims(num_experts, dim, out_dim)
        if backend not in ("auto", "torch", "loop"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'loop', got {backend!r}")
        self.num_experts = num_experts
        self.dim = dim
        self.out_dim = out_dim
        self.backend = backend
        self.w_EDO = nn.Parameter(torch.empty(num_experts, dim, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default scale per expert (uniform in ``±1/sqrt(D)``), in place."""
        ExpertInit().apply(self.w_EDO, self.dim)

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R O"]:
        """Each expert's rows times its matrix."""
        _check_row_shapes(grouped, group_sizes, self.dim, self.num_experts)
        if grouped.dtype != self.w_EDO.dtype:
            raise TypeError(
                f"grouped has dtype {grouped.dtype} but the expert weights are {self.w_EDO.dtype}"
            )
        check_same_device(grouped, "grouped", self.w_EDO, "the expert weights")
        return grouped_mm(grouped, self.w_EDO, group_sizes, self.backend)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"num_experts={self.num_experts}, dim={self.dim}, out_dim={self.out_dim}"
