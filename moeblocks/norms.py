"""RMS normalisation as transformers' models compute it, for norms placed inside an MoE layer.

Legend: T tokens or rows (any leading dims), D dim of the normalised vectors, E experts.

:class:`RMSNorm` normalises each row by its root mean square,
``y = x / sqrt(mean(x²) + eps) · s`` with the learned scale ``s = offset + w``, in float32
whatever the input dtype (as Hugging Face's norms do; ``torch.nn.RMSNorm`` computes in
the input dtype, so a float64 model would differ from those blocks by float32 rounding),
and rounds back to the input dtype. Its options cover the forms of the MoE blocks that
carry norms around their experts, on their router's input or on their output:

- ``offset=1.0``: the weight is stored as ``w`` and applied as ``1 + w`` (starts at 0).
- ``scale_first=True``: scale, round to the input dtype, then normalise (no scale after).
- ``num_experts=E``: one weight per expert (``weight_ED``), each row scaled by its own
  expert's (the rows' expert ids are passed in).
- ``weight_dtype``: where the scale multiplies the normalised row: in the compute dtype
  (``"compute"``, the default: Gemma), in the promoted dtype of the float32 row and the
  weight (``"weight"``: Ergo), or after the row is rounded to the input dtype
  (``"input"``: Llama, AXK-1).
- ``elementwise_affine=False``: no weight at all (as ``torch.nn.RMSNorm``).
- ``inverse_root="pow"``: ``pow(·, −½)`` instead of rsqrt (Gemma): equal values, but in
  float32 their gradients round apart (~1e-7).

The normalisation itself is ``torch.nn.functional.rms_norm`` (or, for ``"pow"``, that op).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from moeblocks._checks import check_float, check_index

__all__ = ["RMSNorm"]

_WEIGHT_DTYPES = ("compute", "weight", "input")
_ROOTS = ("rsqrt", "pow")


def _check_options(
    dim: int,
    eps: float,
    num_experts: int | None,
    offset: float,
    weight_dtype: str,
    inverse_root: str,
    compute_dtype: object,
) -> None:
    """The argument checks of :class:`RMSNorm`, each naming the argument."""
    for name, value in (("dim", dim), ("num_experts", num_experts)):
        if value is None and name == "num_experts":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(offset, (int, float)) and math.isfinite(offset)):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    if weight_dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {_WEIGHT_DTYPES}, got {weight_dtype!r}")
    if inverse_root not in _ROOTS:
        raise ValueError(f"inverse_root must be one of {_ROOTS}, got {inverse_root!r}")
    if compute_dtype is not None and not (
        isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
    ):
        raise ValueError(
            f"compute_dtype must be None or a floating torch.dtype, got {compute_dtype!r}"
        )


class RMSNorm(nn.Module):
    """RMS norm computed in ``compute_dtype`` (float32), with a shared or per-expert scale.

    Args:
        dim: Size D of the normalised last dim.
        eps: Added to the mean square, finite and >= 0.
        num_experts: None for one weight ``weight_D`` (``[D]``); E for one weight per
            expert, ``weight_ED`` (``[E, D]``), chosen per row by ``expert`` in forward.
        offset: The scale is ``offset + w`` (0: the weight itself, starts at 1; 1: the
            weight is a deviation from 1, starts at 0).
        scale_first: Scale the input, round it to its dtype, then normalise (MuseSpark's
            post-expert norm), instead of normalising and then scaling.
        weight_dtype: Where the scale multiplies the normalised row (scale after only):
            ``"compute"`` (the scale cast to ``compute_dtype``; Gemma), ``"weight"`` (the
            compute-dtype row times the scale in its own dtype, promoted; Ergo) or
            ``"input"`` (the row rounded to the input dtype, times the scale cast to it;
            Llama, AXK-1).
        elementwise_affine: Learn a scale; False: ``weight`` is None and the norm only
            normalises (no ``num_experts``, ``offset`` or ``scale_first`` then).
        inverse_root: How ``1 / sqrt(mean(x²) + eps)`` is computed: ``"rsqrt"``
            (``torch.nn.functional.rms_norm``; Llama) or ``"pow"`` (``pow(·, −½)``;
            Gemma). Equal values; in float32 their gradients round apart (~1e-7).
        compute_dtype: Dtype of the normalisation; None: the input's own.

    Raises:
        ValueError: If an argument is out of its range, or ``elementwise_affine=False`` is
            combined with ``num_experts``, ``offset`` or ``scale_first``.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        num_experts: int | None = None,
        offset: float = 0.0,
        scale_first: bool = False,
        weight_dtype: str = "compute",
        elementwise_affine: bool = True,
        inverse_root: str = "rsqrt",
        compute_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__()
        _check_options(dim, eps, num_experts, offset, weight_dtype, inverse_root, compute_dtype)
        if not elementwise_affine and (num_experts is not None or offset or scale_first):
            raise ValueError(
                "elementwise_affine=False has no weight, so it takes no num_experts, offset "
                f"or scale_first, got num_experts={num_experts!r}, offset={offset!r}, "
                f"scale_first={scale_first!r}"
            )
        self.dim = dim
        self.eps = float(eps)
        self.num_experts = num_experts
        self.offset = float(offset)
        self.scale_first = bool(scale_first)
        self.weight_dtype = weight_dtype
        self.inverse_root = inverse_root
        self.compute_dtype = compute_dtype
        shape = (dim,) if num_experts is None else (num_experts, dim)
        self.weight = nn.Parameter(torch.empty(shape)) if elementwise_affine else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Set the weight so that the scale ``offset + w`` is 1, in place."""
        if self.weight is not None:
            self.weight.fill_(1.0 - self.offset)

    def _scale(self, expert: Tensor | None, rows: tuple[int, ...]) -> Tensor:
        w = self.weight
        if self.num_experts is not None:
            if expert is None:
                raise ValueError("expert (the rows' expert ids) is required with num_experts")
            check_index(expert, "expert")
            if tuple(expert.shape) != rows:
                raise ValueError(f"expert must have shape {list(rows)}, got {tuple(expert.shape)}")
            w = w.index_select(0, expert.reshape(-1)).reshape(*rows, self.dim)
        return w if self.offset == 0.0 else self.offset + w

    def _normalise(self, x_c: Tensor) -> Tensor:
        if self.inverse_root == "pow":
            return x_c * torch.pow(x_c.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return F.rms_norm(x_c, (self.dim,), eps=self.eps)

    def forward(
        self, x: Float[Tensor, "*T D"], expert: Int[Tensor, "*T"] | None = None
    ) -> Float[Tensor, "*T D"]:
        """Normalise and scale every row of ``x``, in ``x``'s dtype.

        Args:
            x: The rows.
            expert: The rows' expert ids (with ``num_experts``; ignored without).

        Raises:
            TypeError: If ``x`` is not a floating-point tensor.
            ValueError: If ``x``'s last dim is not ``dim``, or ``expert`` is missing or
                mis-shaped with ``num_experts``.
        """
        check_float(x, "x")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [..., {self.dim}], got {tuple(x.shape)}")
        cdt = x.dtype if self.compute_dtype is None else self.compute_dtype
        if self.weight is None:
            return self._normalise(x.to(cdt)).to(x.dtype)
        scale = self._scale(expert, tuple(x.shape[:-1]))
        if self.scale_first:
            scaled = (x.to(cdt) * scale.to(cdt)).to(x.dtype).to(cdt)
            return self._normalise(scaled).to(x.dtype)
        normed = self._normalise(x.to(cdt))
        if self.weight_dtype == "input":
            return scale.to(x.dtype) * normed.to(x.dtype)
        return (normed * (scale.to(cdt) if self.weight_dtype == "compute" else scale)).to(x.dtype)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return (
            f"dim={self.dim}, eps={self.eps}, num_experts={self.num_experts}, "
            f"offset={self.offset}, scale_first={self.scale_first}, "
            f"weight_dtype={self.weight_dtype!r}, elementwise_affine={self.weight is not None}, "
            f"inverse_root={self.inverse_root!r}, compute_dtype={self.compute_dtype}"
        )
