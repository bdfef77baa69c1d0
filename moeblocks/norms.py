"""RMS normalisation of expert outputs and latent rows, as transformers' models compute it.

Legend: R rows, D dim of the normalised vectors, E experts.

:class:`RMSNorm` normalises each row by its root mean square,
``y = x / sqrt(mean(x²) + eps) · s`` with the learned scale ``s = offset + w``, in float32
whatever the input dtype (as Hugging Face's norms do; a float64 model rounds here), and
rounds back to the input dtype. Its options cover the forms of the MoE blocks that carry
norms around their experts:

- ``offset=1.0``: the weight is stored as ``w`` and applied as ``1 + w`` (starts at 0).
- ``scale_first=True``: scale, round to the input dtype, then normalise (no scale after).
- ``num_experts=E``: one weight per expert (``weight_ED``), each row scaled by its own
  expert's (the rows' expert ids are passed in).
- ``float32_weight=False``: the float32 normalised row times the weight in the weight's
  own dtype (a float64 weight promotes the product), instead of the weight cast to float32.

The normalisation itself is ``torch.nn.functional.rms_norm``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from moeblocks._checks import check_float, check_index

__all__ = ["RMSNorm"]


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
        float32_weight: Cast the scale to ``compute_dtype`` before multiplying (False:
            multiply in the promoted dtype of the normalised row and the weight).
        compute_dtype: Dtype of the normalisation; None: the input's own.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        *,
        num_experts: int | None = None,
        offset: float = 0.0,
        scale_first: bool = False,
        float32_weight: bool = True,
        compute_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_experts", num_experts)):
            if value is None and name == "num_experts":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if not (isinstance(offset, (int, float)) and math.isfinite(offset)):
            raise ValueError(f"offset must be a finite number, got {offset!r}")
        self.dim = dim
        self.eps = float(eps)
        self.num_experts = num_experts
        self.offset = float(offset)
        self.scale_first = bool(scale_first)
        self.float32_weight = bool(float32_weight)
        self.compute_dtype = compute_dtype
        shape = (dim,) if num_experts is None else (num_experts, dim)
        self.weight = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Set the weight so that the scale ``offset + w`` is 1, in place."""
        self.weight.fill_(1.0 - self.offset)

    def _scale(self, expert: Tensor | None, rows: int) -> Tensor:
        if self.num_experts is None:
            w = self.weight
        else:
            if expert is None:
                raise ValueError("expert (the rows' expert ids) is required with num_experts")
            check_index(expert, "expert", 1)
            if expert.shape != (rows,):
                raise ValueError(f"expert must have shape [{rows}], got {tuple(expert.shape)}")
            w = self.weight.index_select(0, expert)
        return w if self.offset == 0.0 else self.offset + w

    def forward(
        self, x: Float[Tensor, "R D"], expert: Int[Tensor, " R"] | None = None
    ) -> Float[Tensor, "R D"]:
        """Normalise and scale every row of ``x``; ``expert`` picks per-expert scales."""
        check_float(x, "x", 2)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [rows, {self.dim}], got {tuple(x.shape)}")
        scale = self._scale(expert, x.shape[0])
        cdt = x.dtype if self.compute_dtype is None else self.compute_dtype
        if self.scale_first:
            scaled = (x.to(cdt) * scale.to(cdt)).to(x.dtype).to(cdt)
            return F.rms_norm(scaled, (self.dim,), eps=self.eps).to(x.dtype)
        normed = F.rms_norm(x.to(cdt), (self.dim,), eps=self.eps)
        return (normed * (scale.to(cdt) if self.float32_weight else scale)).to(x.dtype)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return (
            f"dim={self.dim}, eps={self.eps}, num_experts={self.num_experts}, "
            f"offset={self.offset}, scale_first={self.scale_first}, "
            f"float32_weight={self.float32_weight}, compute_dtype={self.compute_dtype}"
        )
