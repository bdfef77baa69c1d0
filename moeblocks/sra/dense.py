"""The decoder's dense parts, initialised GPT-2 style, and the dense FFN baseline.

Legend: B batch, S sequence length, D model dim, F hidden width, L layers.

They sit below :mod:`moeblocks.sra.routing_presets` (which builds every FFN the config
names, the dense baseline included) and :mod:`moeblocks.sra.model` (whose attention uses
:class:`NormalLinear`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from moeblocks.sra.config import SRAConfig

__all__ = ["DenseFFN", "NormalLinear", "residual_std"]


def residual_std(config: SRAConfig) -> float:
    """GPT-2's std of projections into the residual stream: ``0.02 / sqrt(2L)``.

    They start smaller by ``sqrt(2L)`` so the stream's variance does not grow with depth.
    """
    return 0.02 / math.sqrt(2 * config.n_layers)


class NormalLinear(nn.Linear):
    """``nn.Linear`` initialised GPT-2 style: weight N(0, std²), bias 0.

    Each dense layer owns its init, so :func:`moeblocks.init_weights` (every module's
    ``reset_parameters``, children first) initialises a sharded model one module at a
    time and eagerly built and ``meta``-built models draw the same numbers.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, std: float) -> None:
        self.std = std  # read by reset_parameters, which nn.Linear's __init__ calls
        super().__init__(in_features, out_features, bias=bias)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weight N(0, std²), bias 0, in place."""
        nn.init.normal_(self.weight, std=self.std)
        if self.bias is not None:
            self.bias.zero_()


class DenseFFN(nn.Module):
    """The dense baseline: one SwiGLU or GELU MLP of width ``config.dense_width`` per token."""

    def __init__(self, config: SRAConfig) -> None:
        super().__init__()
        hidden = config.dense_width
        self.kind = config.expert
        self.dropout = config.dropout
        width = (2 if self.kind == "swiglu" else 1) * hidden
        bias, std_out = config.expert_bias, residual_std(config)
        self.w_in = NormalLinear(config.d_model, width, bias=bias, std=0.02)
        self.w_out = NormalLinear(hidden, config.d_model, bias=bias, std=std_out)

    def forward(self, x: Float[Tensor, "B S D"]) -> Float[Tensor, "B S D"]:
        """Apply the MLP token-wise."""
        h = self.w_in(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.w_out(F.dropout(h, self.dropout, self.training))
