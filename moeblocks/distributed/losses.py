"""Auxiliary losses whose token statistics cover every rank, not just the local batch.

Legend: T tokens on this rank, E experts, K experts per token, C reduced columns.

With data or expert parallelism each rank routes its own tokens, so a balance loss
computed from local statistics balances each rank's batch, not the global one, and
bandpass sees a noisy ``P_e``. :class:`GroupReducedLoss` replaces the local token means
by global ones: every rank sums its per-token columns over its real tokens, one
differentiable all-reduce (E + E + 1 numbers at most) adds them up over the group, and the
loss formula is evaluated on the global means. Each rank then holds the same value, the
one a single process would compute on the concatenated batch.

Gradients: the all-reduce's backward sums the incoming gradients over the group, so when
every rank adds the loss to its objective and the gradients are averaged over the W ranks
(:func:`~moeblocks.distributed.all_reduce_gradients`), the result is the gradient of the
global loss, exactly as on one process.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from moeblocks.distributed.comm import all_reduce_sum
from moeblocks.layer import MoELayer
from moeblocks.losses import (
    AuxLoss,
    BandpassLoss,
    CVSquaredLoss,
    DispersionLoss,
    LoadBalanceLoss,
    ZLoss,
)
from moeblocks.routing import Routing

__all__ = ["GroupReducedLoss", "global_mean_expert_probs", "reduce_aux_losses"]

_TOKEN_STAT_LOSSES = (LoadBalanceLoss, CVSquaredLoss, BandpassLoss, ZLoss)


def _global_token_means(
    per_token: Float[Tensor, "T C"],
    mask: Bool[Tensor, " T"] | None,
    group: ProcessGroup | None,
) -> Float[Tensor, " C"]:
    """Mean of each column over the real tokens of every rank (0 with no real token)."""
    T = per_token.shape[0]
    if mask is None:
        m_T = per_token.new_ones(T)
    elif mask.shape != (T,):
        raise ValueError(f"mask must have shape [{T}], got {tuple(mask.shape)}")
    else:
        m_T = mask.to(per_token.dtype)
    sums = torch.cat([m_T @ per_token, m_T.sum().unsqueeze(0)])
    total = all_reduce_sum(sums, group)
    # Clamped so that a group with no real token gives zeros, not NaN (as losses.py does).
    return total[:-1] / total[-1].clamp(min=1.0)


def global_mean_expert_probs(
    routing: Routing, mask: Bool[Tensor, " T"] | None = None, group: ProcessGroup | None = None
) -> Float[Tensor, " E"]:
    """``P_e`` over the real tokens of every rank of ``group`` (differentiable, collective).

    The group-wide counterpart of :func:`moeblocks.losses.mean_expert_probs`.
    """
    return _global_token_means(routing.probs, mask, group)


class GroupReducedLoss(nn.Module):
    """Wraps an aux loss so its token statistics are reduced over a process group.

    Supported: :class:`~moeblocks.LoadBalanceLoss` (``f_e`` and ``P_e``),
    :class:`~moeblocks.CVSquaredLoss` and :class:`~moeblocks.BandpassLoss` (``P_e``),
    :class:`~moeblocks.ZLoss` (mean squared logsumexp), each with the formula and
    normalisation of the wrapped class, evaluated on global means.
    :class:`~moeblocks.DispersionLoss` depends only on the (replicated) anchors and is
    passed through. A collective: every rank of ``group`` must call it.

    Args:
        loss: The loss to wrap; its ``weight`` (and bandpass corridor) is used as is.
        group: Ranks whose tokens form the global batch: the whole data × expert-parallel
            world for expert parallelism. ``None`` is the world group.

    Raises:
        TypeError: For a loss of another type, whose statistics this cannot reduce.
    """

    def __init__(self, loss: AuxLoss, group: ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(loss, (*_TOKEN_STAT_LOSSES, DispersionLoss)):
            raise TypeError(
                "loss must be a LoadBalanceLoss, CVSquaredLoss, BandpassLoss, ZLoss or "
                f"DispersionLoss, got {type(loss).__name__}"
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
        self, routing: Routing, router: nn.Module, mask: Bool[Tensor, " T"] | None = None
    ) -> Float[Tensor, ""]:
        """The unweighted loss on global statistics (the same value on every rank)."""
        loss, E = self.loss, routing.num_experts
        if isinstance(loss, DispersionLoss):
            return loss(routing, router, mask)
        if isinstance(loss, ZLoss):
            z2_T1 = torch.logsumexp(routing.scores, dim=-1).square().unsqueeze(1)
            return _global_token_means(z2_T1, mask, self.group)[0]
        if isinstance(loss, LoadBalanceLoss):
            slots_TE = F.one_hot(routing.experts, E).to(routing.probs.dtype).sum(dim=1)
            means = _global_token_means(
                torch.cat([routing.probs, slots_TE / routing.top_k], dim=1), mask, self.group
            )
            P_E, f_E = means[:E], means[E:]
            return E * (f_E * P_E).sum()
        P_E = global_mean_expert_probs(routing, mask, self.group)
        if isinstance(loss, CVSquaredLoss):
            if E == 1:
                return P_E.sum() * 0
            return P_E.var(unbiased=False) / P_E.mean().square().clamp(min=1e-12)
        assert isinstance(loss, BandpassLoss)
        below_E = F.relu(loss.floor - P_E).square()
        above_E = F.relu(P_E - loss.ceiling).square()
        return E**2 * (below_E + above_E).mean()

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
        if layer._plain_losses:
            raise TypeError(
                f"plain-callable losses {sorted(layer._plain_losses)} cannot be reduced "
                "across ranks; give them as nn.Module losses"
            )
        for name, loss in list(layer.losses.items()):
            if not isinstance(loss, GroupReducedLoss):
                layer.losses[name] = GroupReducedLoss(loss, group)
    return module
