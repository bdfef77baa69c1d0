"""Auxiliary losses whose token statistics cover every rank, not just the local batch.

Legend: T tokens on this rank, E experts, K experts per token.

With data or expert parallelism each rank routes its own tokens, so a balance loss
computed from local statistics balances each rank's batch, not the global one, and
bandpass sees a noisy ``P_e``. :class:`GroupReducedLoss` replaces the local statistics
by global ones: every rank computes its :class:`~moeblocks.losses.TokenStats` (sums over
its real tokens), one differentiable all-reduce of 2E + 3 numbers adds them up over the
group, and the wrapped loss's own ``from_stats`` evaluates its formula on the global
means. Each rank then holds the same value, the one a single process would compute on
the concatenated batch.

Gradients: the all-reduce's backward sums the incoming gradients over the group, so when
every rank adds the loss to its objective and the gradients are averaged over the W ranks
(:func:`~moeblocks.distributed.all_reduce_gradients`), the result is the gradient of the
global loss, exactly as on one process.
"""

from __future__ import annotations

import copy

from jaxtyping import Bool, Float
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from moeblocks.distributed.comm import all_reduce_sum
from moeblocks.layer import MoELayer
from moeblocks.losses import (
    AuxLoss,
    DispersionLoss,
    MaskArg,
    TokenStatLoss,
    TokenStats,
    _mask_of,
)
from moeblocks.routing import Routing

__all__ = [
    "GroupReducedLoss",
    "global_mean_expert_probs",
    "global_token_stats",
    "reduce_aux_losses",
]


def global_token_stats(
    routing: Routing, mask: Bool[Tensor, " T"] | None = None, group: ProcessGroup | None = None
) -> TokenStats:
    """:class:`~moeblocks.losses.TokenStats` summed over every rank of ``group``.

    Differentiable and collective: every rank of ``group`` must call it.
    """
    total = all_reduce_sum(TokenStats.of(routing, mask).to_vector(), group)
    return TokenStats.from_vector(total)


def global_mean_expert_probs(
    routing: Routing, mask: Bool[Tensor, " T"] | None = None, group: ProcessGroup | None = None
) -> Float[Tensor, " E"]:
    """``P_e`` over the real tokens of every rank of ``group`` (differentiable, collective).

    The group-wide counterpart of :func:`moeblocks.losses.mean_expert_probs`.
    """
    return global_token_stats(routing, mask, group).mean_probs


class GroupReducedLoss(nn.Module):
    """Wraps an aux loss so its token statistics are reduced over a process group.

    Supported: every :class:`~moeblocks.losses.TokenStatLoss` (``LoadBalanceLoss``,
    ``CVSquaredLoss``, ``BandpassLoss``, ``ZLoss``), whose own ``from_stats`` formula is
    evaluated on the group's statistics. :class:`~moeblocks.DispersionLoss` depends only
    on the (replicated) anchors and is passed through. A collective: every rank of
    ``group`` must call it.

    Args:
        loss: The loss to wrap; its ``weight`` (and bandpass corridor) is used as is.
        group: Ranks whose tokens form the global batch: the whole data × expert-parallel
            world for expert parallelism. ``None`` is the world group.

    Raises:
        TypeError: For a loss of another type, whose statistics this cannot reduce.
    """

    def __init__(self, loss: AuxLoss, group: ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(loss, (TokenStatLoss, DispersionLoss)):
            raise TypeError(
                "loss must be a TokenStatLoss (LoadBalanceLoss, CVSquaredLoss, BandpassLoss, "
                f"ZLoss) or a DispersionLoss, got {type(loss).__name__}"
            )
        self.loss = loss
        self.group = group

    def __deepcopy__(self, memo: dict[int, object]) -> GroupReducedLoss:
        """A copy over the same process group (a group is a communicator handle, not state)."""
        return GroupReducedLoss(copy.deepcopy(self.loss, memo), self.group).train(self.training)

    @property
    def weight(self) -> float:
        """The wrapped loss's weight."""
        return self.loss.weight

    def forward(
        self, routing: Routing, mask: MaskArg = None, *legacy: Bool[Tensor, " T"] | None
    ) -> Float[Tensor, ""]:
        """The unweighted loss on global statistics (the same value on every rank)."""
        if isinstance(self.loss, DispersionLoss):
            return self.loss(routing, mask, *legacy)
        return self.loss.from_stats(global_token_stats(routing, _mask_of(mask, legacy), self.group))

    def extra_repr(self) -> str:
        """Name the group in the module's repr."""
        return "group=world" if self.group is None else "group=custom"


def reduce_aux_losses(module: nn.Module, group: ProcessGroup | None = None) -> nn.Module:
    """Wrap every aux loss of every MoE layer in ``module`` in a :class:`GroupReducedLoss`.

    In place; returns ``module``. Layers whose losses are already wrapped are left as
    they are.

    Args:
        module: A model holding MoE layers, or one layer.
        group: Ranks whose tokens form the global batch; ``None`` is the world group.

    Raises:
        TypeError: If a layer has a loss :class:`GroupReducedLoss` cannot reduce, or a
            plain-callable loss (kept outside the module tree, so it cannot be wrapped).
    """
    for layer in module.modules():
        if not isinstance(layer, MoELayer):
            continue
        if layer.plain_losses:
            raise TypeError(
                f"plain-callable losses {sorted(layer.plain_losses)} cannot be reduced "
                "across ranks; give them as nn.Module losses"
            )
        for name, loss in list(layer.losses.items()):
            if not isinstance(loss, GroupReducedLoss):
                layer.losses[name] = GroupReducedLoss(loss, group)
    return module
