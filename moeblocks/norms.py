"""RMS normalisation with an explicit compute dtype, for norms placed inside an MoE layer.

Legend: T tokens (any leading dims), D model dim.

``RMSNorm(x) = x / sqrt(mean_D(x²) + eps) · w``. Several Hugging Face MoE blocks put such
norms around their experts (AXK-1 on the block output; Gemma-4 on each branch and on its
router's input) and compute them in float32 whatever the model dtype, with the weight
multiplied either after casting back to the model dtype (Llama's form) or before
(Gemma's). ``torch.nn.RMSNorm`` computes in the input dtype, so a float64 model would
differ from those blocks by float32 rounding (~1e-7); this norm states both choices and
computes the normalisation with ``torch.nn.functional.rms_norm`` (or, for Gemma's
``pow(·, −½)``, with that op: its backward rounds differently from rsqrt's in float32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from moeblocks._checks import check_float

__all__ = ["RMSNorm"]

_COMPUTE = ("input", "float32")
_WEIGHT = ("input", "compute")
_ROOT = ("rsqrt", "pow")


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, optionally scaled by a learnable weight.

    ``y = x / sqrt(mean(x²) + eps)`` computed in ``compute_dtype`` and cast back to the
    input dtype; with ``weight=True`` it is multiplied by ``weight_D`` (initialised to
    ones), in the input dtype after the cast (``weight_dtype="input"``: Llama, AXK-1) or
    in the compute dtype before it (``"compute"``: Gemma-4).

    Args:
        dim: Size D of the normalised (last) dim.
        eps: Added to the mean square, >= 0.
        weight: Learn a per-channel scale ``weight_D``.
        compute_dtype: ``"input"`` (the tokens' dtype) or ``"float32"``.
        weight_dtype: Where the weight multiplies: ``"input"`` or ``"compute"``.
        inverse_root: How ``1 / sqrt(mean(x²) + eps)`` is computed: ``"rsqrt"``
            (``torch.nn.functional.rms_norm``; Llama) or ``"pow"`` (``pow(·, −½)``,
            Gemma-4). Equal values; in float32 their gradients round apart (~1e-7).
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        weight: bool = True,
        compute_dtype: str = "float32",
        weight_dtype: str = "input",
        inverse_root: str = "rsqrt",
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        if compute_dtype not in _COMPUTE:
            raise ValueError(f"compute_dtype must be one of {_COMPUTE}, got {compute_dtype!r}")
        if weight_dtype not in _WEIGHT:
            raise ValueError(f"weight_dtype must be one of {_WEIGHT}, got {weight_dtype!r}")
        if inverse_root not in _ROOT:
            raise ValueError(f"inverse_root must be one of {_ROOT}, got {inverse_root!r}")
        self.dim = dim
        self.inverse_root = inverse_root
        self.eps = float(eps)
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype
        self.weight_D = nn.Parameter(torch.empty(dim)) if weight else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Set the weight to ones (the identity scale), in place."""
        if self.weight_D is not None:
            self.weight_D.fill_(1.0)

    def forward(self, x: Float[Tensor, "*T D"]) -> Float[Tensor, "*T D"]:
        """The normalised (and scaled) ``x``, in ``x``'s dtype.

        Raises:
            TypeError: If ``x`` is not a floating-point tensor.
            ValueError: If ``x``'s last dim is not ``dim``.
        """
        check_float(x, "x")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [..., {self.dim}], got {tuple(x.shape)}")
        dtype = torch.float32 if self.compute_dtype == "float32" else x.dtype
        x_c = x.to(dtype)
        if self.inverse_root == "pow":
            y = x_c * torch.pow(x_c.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        else:
            y = F.rms_norm(x_c, (self.dim,), None, self.eps)
        if self.weight_D is None:
            return y.to(x.dtype)
        if self.weight_dtype == "compute":
            return (y * self.weight_D.to(dtype)).to(x.dtype)
        return self.weight_D.to(x.dtype) * y.to(x.dtype)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return (
            f"{self.dim}, eps={self.eps}, weight={self.weight_D is not None}, "
            f"compute_dtype={self.compute_dtype!r}, weight_dtype={self.weight_dtype!r}, "
            f"inverse_root={self.inverse_root!r}"
        )
