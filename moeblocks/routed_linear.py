"""Routed per-expert linear maps around a per-slot computation (a mixture of attention heads).

Legend: T tokens, D model dim, H width of one slot, E experts, K experts per token,
R grouped rows.

In a mixture of attention heads (Zhang et al. 2022; JetMoE's attention) the experts are
pairs of linear maps, not FFNs: ``map`` routes each token to K experts and projects it
into each chosen expert's slot (``x · W_in[e]``, ``[T, K, H]``); the caller computes
something per slot (attention over the slots' heads); ``reduce`` projects every slot back
with its expert's output map and sums the K slots with the routing weights, plus a bias:

    out_t = Σ_k w_tk · (h_tk · W_out[e_tk]) + b

Routing, dispatch and the per-expert matmuls are the stock parts: any router, any
dispatcher, two :class:`~moeblocks.experts.LinearExperts` banks.
"""

from __future__ import annotations

import inspect

import torch
from jaxtyping import Float
from torch import Tensor, nn

from moeblocks._checks import check_tokens
from moeblocks.dispatch import Dispatcher
from moeblocks.experts import LinearExperts
from moeblocks.routers import RouterProtocol
from moeblocks.routing import Layout, Routing

__all__ = ["RoutedLinear"]


class RoutedLinear(nn.Module):
    """Route tokens into per-expert slots (``map``) and back into tokens (``reduce``).

    Args:
        router: Any router (``(tokens, k=None) -> Routing``).
        dispatcher: Groups the routed copies by expert.
        hidden: Width H of one slot.
        bias: A learnable bias ``bias_D`` added to ``reduce``'s output (starts at 0).
    """

    def __init__(
        self, router: RouterProtocol, dispatcher: Dispatcher, hidden: int, *, bias: bool = True
    ) -> None:
        super().__init__()
        # The protocol's attributes alone fit a scorer too; a router's forward takes k.
        forward = getattr(router, "forward", None)
        takes_k = callable(forward) and "k" in inspect.signature(forward).parameters
        if (
            not isinstance(router, nn.Module)
            or not isinstance(router, RouterProtocol)
            or not takes_k
        ):
            raise TypeError(
                "router must be an nn.Module with dim, num_experts and forward(tokens, k=None) "
                f"-> Routing, got {type(router).__name__}"
            )
        if not isinstance(dispatcher, Dispatcher):
            raise TypeError(
                f"dispatcher must implement permute/unpermute, got {type(dispatcher).__name__}"
            )
        E, D = router.num_experts, router.dim
        self.router = router
        self.dispatcher = dispatcher
        self.map_in = LinearExperts(E, D, hidden)
        self.map_out = LinearExperts(E, hidden, D)
        self.bias_D = nn.Parameter(torch.empty(D)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero the output bias, in place (the banks initialise their own weights)."""
        if self.bias_D is not None:
            self.bias_D.zero_()

    @property
    def dim(self) -> int:
        """Model dimension D."""
        return self.router.dim

    @property
    def hidden(self) -> int:
        """Width H of one slot."""
        return self.map_in.out_dim

    def map(
        self, tokens: Float[Tensor, "T D"], k: int | None = None
    ) -> tuple[Float[Tensor, "T K H"], Routing, Layout]:
        """Route the tokens and project each into its K experts' slots.

        Returns:
            The slots ``[T, K, H]`` (slot ``(t, k)`` is ``tokens[t] · W_in[experts[t, k]]``),
            the routing record and the dispatch layout (both for :meth:`reduce`).
        """
        check_tokens(tokens, self.dim)
        routing = self.router(tokens, k=k)
        grouped_RD, layout = self.dispatcher.permute(tokens, routing)
        slots_RH = self.map_in(grouped_RD, layout.group_sizes)
        T, K = routing.experts.shape
        return slots_RH.index_select(0, layout.row_of_slot).view(T, K, self.hidden), routing, layout

    def reduce(
        self, slots: Float[Tensor, "T K H"], routing: Routing, layout: Layout
    ) -> Float[Tensor, "T D"]:
        """Project every slot back with its expert's map and sum the K slots, weighted."""
        T, K = routing.experts.shape
        if slots.shape != (T, K, self.hidden):
            raise ValueError(
                f"slots must have shape [{T}, {K}, {self.hidden}], got {tuple(slots.shape)}"
            )
        slot_R = layout.slot_of_row
        rows_RH = slots.reshape(T * K, self.hidden).index_select(0, slot_R.clamp(min=0))
        rows_RH = rows_RH.masked_fill((slot_R < 0).unsqueeze(1), 0)  # padding rows
        out_RD = self.map_out(rows_RH, layout.group_sizes)
        out_TD = self.dispatcher.unpermute(out_RD, layout, routing.weights)
        return out_TD if self.bias_D is None else out_TD + self.bias_D
