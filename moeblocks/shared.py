"""Shared experts: always-on experts whose output is added to the routed output.

Legend: T tokens, D model dim, S shared experts.

DeepSeek-V3, Qwen2-MoE and Llama-4 run one or more dense experts on every token next to
the routed ones. :class:`SharedExperts` wraps any expert bank and runs each of its S
experts on all T tokens, summing their outputs; an optional sigmoid gate (Qwen2-MoE)
scales the sum per token: ``shared(x) = σ(x · gate_D) · Σ_s expert_s(x)``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from moeblocks._checks import check_tokens
from moeblocks.experts import ExpertBank

__all__ = ["SharedExperts"]


class SharedExperts(nn.Module):
    """S always-on experts, optionally behind a per-token sigmoid gate.

    S experts of hidden size F compute the same function as one expert of hidden size
    S·F (DeepSeek-V3 stores its two shared experts that way); both forms are accepted.

    Args:
        experts: An expert bank (e.g. ``SwiGLUExperts(1, dim, hidden)``); each of its
            experts runs on every token.
        gate: Add a learnable gate ``σ(x · gate_D)`` (``gate_D`` of shape ``[D]``) that
            scales the shared output per token (Qwen2-MoE).
    """

    def __init__(self, experts: ExpertBank, gate: bool = False) -> None:
        super().__init__()
        if not isinstance(experts, nn.Module) or not isinstance(experts, ExpertBank):
            raise TypeError(
                f"experts must be an nn.Module expert bank, got {type(experts).__name__}"
            )
        self.experts = experts
        self.gate_D = nn.Parameter(torch.empty(experts.dim)) if gate else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero the gate weight (the gate starts at σ(0) = 1/2), in place."""
        if self.gate_D is not None:
            self.gate_D.zero_()

    @property
    def dim(self) -> int:
        """Model dimension D."""
        return self.experts.dim

    def forward(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T D"]:
        """The summed (and gated) output of the shared experts on every token.

        Raises:
            ValueError: If ``tokens`` is not ``[T, dim]``.
            TypeError: If ``tokens`` is not a floating-point tensor.
        """
        check_tokens(tokens, self.dim)
        T, S = tokens.shape[0], self.experts.num_experts
        sizes_S = torch.full((S,), T, dtype=torch.long, device=tokens.device)
        grouped = tokens if S == 1 else tokens.repeat(S, 1)
        out_TD = self.experts(grouped, sizes_S)
        if S > 1:
            # Not view(S, T, -1): with T = 0 the -1 would be ambiguous.
            out_TD = out_TD.view(S, T, out_TD.shape[-1]).sum(0)
        if self.gate_D is not None:
            out_TD = torch.sigmoid(tokens @ self.gate_D.to(tokens.dtype)).unsqueeze(-1) * out_TD
        return out_TD

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"gate={self.gate_D is not None}"
