"""A latent space for the routed experts: tokens projected down before them, back after.

Legend: T tokens, D model dim, L latent dim of the routed experts.

NemotronH's latent MoE and MuseSpark route on the model-dim tokens but run their routed
experts in a smaller space: ``down`` maps each token ``D → L`` (a linear map, an optional
bias, then an optional norm), the dispatcher and the expert bank work on L-dim rows, and
``up`` maps the combined output ``L → D`` (an optional bias after the weighted sum).
:class:`~moeblocks.layer.MoELayer` takes one as ``latent=``; the shared experts still see
the D-dim tokens. Projecting once per token (not once per routed copy) keeps the
dispatched rows L wide, which is the point of the design, and matches HF's rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from moeblocks._checks import check_tokens

__all__ = ["LatentProjection"]


class LatentProjection(nn.Module):
    """``down(x) = norm(x · w_down_DL + b_down_L)`` and ``up(y) = y · w_up_LD + b_up_D``.

    Args:
        dim: Model dimension D.
        latent: Dimension L of the experts' space.
        bias: Learnable biases on both projections (``b_down_L``, ``b_up_D``, start at 0).
        norm: A module ``[T, L] -> [T, L]`` applied after the down projection (e.g.
            :class:`~moeblocks.norms.RMSNorm`).
    """

    def __init__(
        self, dim: int, latent: int, *, bias: bool = False, norm: nn.Module | None = None
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("latent", latent)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if norm is not None and not isinstance(norm, nn.Module):
            raise TypeError(f"norm must be None or an nn.Module, got {type(norm).__name__}")
        self.dim = dim
        self.latent = latent
        self.norm = norm
        self.w_down_DL = nn.Parameter(torch.empty(dim, latent))
        self.w_up_LD = nn.Parameter(torch.empty(latent, dim))
        self.b_down_L = nn.Parameter(torch.empty(latent)) if bias else None
        self.b_up_D = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.Linear``'s default scale (uniform in ``±1/sqrt(fan_in)``), biases zero."""
        nn.init.uniform_(self.w_down_DL, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_up_LD, -1 / math.sqrt(self.latent), 1 / math.sqrt(self.latent))
        for b in (self.b_down_L, self.b_up_D):
            if b is not None:
                b.zero_()

    @property
    def has_bias(self) -> bool:
        """Whether both projections have biases."""
        return self.b_up_D is not None

    def down(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T L"]:
        """The tokens in the experts' space (projected, then normalised if a norm is set)."""
        check_tokens(tokens, self.dim)
        if tokens.dtype != self.w_down_DL.dtype:
            raise TypeError(
                f"tokens have dtype {tokens.dtype} but the projections are {self.w_down_DL.dtype}"
            )
        latent_TL = F.linear(tokens, self.w_down_DL.t(), self.b_down_L)
        return latent_TL if self.norm is None else self.norm(latent_TL)

    def up(self, combined: Float[Tensor, "T L"]) -> Float[Tensor, "T D"]:
        """The experts' combined output back in the model space."""
        check_tokens(combined, self.latent, "combined")
        return F.linear(combined, self.w_up_LD.t(), self.b_up_D)

    def forward(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T L"]:
        """Same as :meth:`down`."""
        return self.down(tokens)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"dim={self.dim}, latent={self.latent}, bias={self.has_bias}"
