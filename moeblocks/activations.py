"""Expert activations: plain ones for two-matrix MLPs, gated ones for GLU experts.

A plain activation is named (``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"relu2"`` (squared
ReLU), ``"silu"``). A gated
activation maps the gate and up projections of a GLU expert to its hidden vector:

- :class:`GLU`: ``act(gate) ⊙ up`` (SwiGLU with ``"silu"``, GEGLU with ``"gelu"``).
- :class:`ClampedSwiGLU` (GPT-OSS): ``(clamp(up, −l, l) + 1) ⊙ g · σ(α g)`` with
  ``g = min(gate, l)``.
- :class:`ClampedGLU` (GLM-5-Next, HY-V4, DeepSeek-V4): ``act(min(gate, l)) ⊙ clamp(up, −l, l)``,
  both halves clamped *before* the activation; with ``after_activation=True``
  (Bailing-Hybrid, Step-3.7): ``min(act(gate), l) ⊙ clamp(up, −l, l)``.
- :class:`GatedInDtype` (Beam): any gated activation computed in another dtype (float32
  in a float64 or bfloat16 expert), its result cast back.
- :class:`SoftCappedSwiGLU` (Inkling2): ``cap_g(gate) · σ(gate) ⊙ cap_u(up)`` with the
  soft cap ``cap_c(v) = c · tanh(v / c)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "GLU",
    "ClampedGLU",
    "ClampedSwiGLU",
    "GatedActivation",
    "GatedInDtype",
    "SoftCappedSwiGLU",
    "activation_fn",
]


def _check_pair(gate: Tensor, up: Tensor) -> None:
    # Broadcasting would silently combine mismatched halves.
    if not isinstance(gate, Tensor) or not isinstance(up, Tensor):
        raise TypeError(
            f"gate and up must be tensors, got {type(gate).__name__} and {type(up).__name__}"
        )
    if gate.shape != up.shape:
        raise ValueError(
            f"gate and up must have one shape, got gate {tuple(gate.shape)} and up "
            f"{tuple(up.shape)}"
        )


_PLAIN: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    # Squared ReLU (Primer; NemotronH's and Ergo's experts): relu(x)².
    "relu2": lambda x: F.relu(x).square(),
    "silu": F.silu,
}
ACTIVATIONS = tuple(_PLAIN)
"""The plain activation names :class:`~moeblocks.MLPExperts` and :class:`GLU` accept."""


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The plain activation called ``name`` (one of :data:`ACTIVATIONS`)."""
    if name not in _PLAIN:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return _PLAIN[name]


@runtime_checkable
class GatedActivation(Protocol):
    """``(gate, up) -> hidden`` for a GLU expert."""

    def __call__(
        self, gate: Float[Tensor, "R F"], up: Float[Tensor, "R F"]
    ) -> Float[Tensor, "R F"]:
        """The expert's hidden vector."""
        ...


@dataclass(frozen=True)
class GLU:
    """``act(gate) ⊙ up``; ``"silu"`` gives SwiGLU.

    Args:
        activation: A plain activation name (see :data:`ACTIVATIONS`).
    """

    activation: str = "silu"

    def __post_init__(self) -> None:
        activation_fn(self.activation)

    def __call__(
        self, gate: Float[Tensor, "R F"], up: Float[Tensor, "R F"]
    ) -> Float[Tensor, "R F"]:
        """``act(gate) ⊙ up``."""
        _check_pair(gate, up)
        return activation_fn(self.activation)(gate) * up


@dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's clamped SwiGLU: ``(clamp(up, −l, l) + 1) ⊙ g · σ(α g)``, ``g = min(gate, l)``.

    Args:
        alpha: Sigmoid slope α (GPT-OSS: 1.702).
        limit: Clamp limit l (GPT-OSS: 7.0), > 0.
    """

    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.alpha) and math.isfinite(self.limit) and self.limit > 0):
            raise ValueError(
                f"need finite alpha and limit > 0, got alpha={self.alpha!r}, limit={self.limit!r}"
            )

    def __call__(
        self, gate: Float[Tensor, "R F"], up: Float[Tensor, "R F"]
    ) -> Float[Tensor, "R F"]:
        """The clamped, shifted SwiGLU."""
        _check_pair(gate, up)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


@dataclass(frozen=True)
class ClampedGLU:
    """A GLU with clamped halves: ``act(min(gate, l)) ⊙ clamp(up, −l, l)``.

    The form of GLM-5-Next, HY-V4 and DeepSeek-V4 (``swiglu_limit``): unlike
    :class:`ClampedSwiGLU` there is no ``+ 1`` on ``up`` and no sigmoid slope. With
    ``after_activation`` the gate is clamped after its activation instead,
    ``min(act(gate), l) ⊙ clamp(up, −l, l)`` (Bailing-Hybrid, Step-3.7).

    Args:
        activation: A plain activation name (see :data:`ACTIVATIONS`; ``"silu"``).
        limit: Clamp limit l, finite and > 0.
        after_activation: Clamp the activated gate rather than its input.
    """

    activation: str = "silu"
    limit: float = 7.0
    after_activation: bool = False

    def __post_init__(self) -> None:
        activation_fn(self.activation)
        if not (isinstance(self.limit, (int, float)) and math.isfinite(self.limit)):
            raise ValueError(f"limit must be a finite number > 0, got {self.limit!r}")
        if self.limit <= 0:
            raise ValueError(f"limit must be a finite number > 0, got {self.limit!r}")

    def __call__(
        self, gate: Float[Tensor, "R F"], up: Float[Tensor, "R F"]
    ) -> Float[Tensor, "R F"]:
        """``act(min(gate, l)) ⊙ clamp(up, −l, l)`` (or ``min(act(gate), l) ⊙ …``)."""
        _check_pair(gate, up)
        act = activation_fn(self.activation)
        up = up.clamp(min=-self.limit, max=self.limit)
        if self.after_activation:
            return act(gate).clamp(max=self.limit) * up
        return act(gate.clamp(max=self.limit)) * up


@dataclass(frozen=True)
class SoftCappedSwiGLU:
    """A SwiGLU whose linear gate factor and up half are soft-capped (Inkling2).

    ``c_g·tanh(gate / c_g) · σ(gate) ⊙ c_u·tanh(up / c_u)``: the sigmoid sees the raw gate;
    only the factor ``gate`` of ``silu(gate) = gate · σ(gate)`` and the ``up`` half are
    bent smoothly into ``(−c, c)``. With ``dtype`` the activation runs in that dtype and
    its result is cast back to the input's (Inkling2 runs it in float32 in any model
    dtype: more precise in bf16, rounded in a float64 model).

    Args:
        gate_cap: Soft cap c_g of the gate factor, finite and > 0.
        up_cap: Soft cap c_u of the up half, finite and > 0.
        dtype: Dtype the activation computes in; None: the input's.
    """

    gate_cap: float = 4.0
    up_cap: float = 25.0
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name in ("gate_cap", "up_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            ):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.dtype is not None and not (
            isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point
        ):
            raise TypeError(f"dtype must be None or a floating torch.dtype, got {self.dtype!r}")

    def __call__(
        self, gate: Float[Tensor, "R F"], up: Float[Tensor, "R F"]
    ) -> Float[Tensor, "R F"]:
        """``cap_g(gate) · σ(gate) ⊙ cap_u(up)``, in ``dtype`` if set."""
        _check_pair(gate, up)
        out_dtype = gate.dtype
        if self.dtype is not None:
            gate, up = gate.to(self.dtype), up.to(self.dtype)
        capped_gate = torch.tanh(gate / self.gate_cap) * self.gate_cap
        capped_up = torch.tanh(up / self.up_cap) * self.up_cap
        return (capped_gate * torch.sigmoid(gate) * capped_up).to(out_dtype)


@dataclass(frozen=True)
class GatedInDtype:
    """Any gated activation computed in ``dtype``: ``inner(gate.to(dtype), up.to(dtype))``.

    The result is cast back to the dtype of ``gate``. Beam evaluates its SwiGLU in float32
    inside experts of any dtype, so in a float64 model the hidden vector is rounded to
    float32 (and in bfloat16 it is computed more precisely than the projections).

    Args:
        activation: The gated activation to run (e.g. ``GLU("silu")``).
        dtype: A floating dtype to compute it in (default float32).
    """

    activation: GatedActivation
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not isinstance(self.activation, GatedActivation):
            raise TypeError(
                "activation must be a gated activation (gate, up) -> hidden, "
                f"got {type(self.activation).__name__}"
            )
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {self.dtype!r}")

    def __call__(
        self, gate: Float[Tensor, "R F"], up: Float[Tensor, "R F"]
    ) -> Float[Tensor, "R F"]:
        """``inner(gate, up)`` in ``dtype``, cast back to ``gate``'s dtype."""
        _check_pair(gate, up)
        return self.activation(gate.to(self.dtype), up.to(self.dtype)).to(gate.dtype)
