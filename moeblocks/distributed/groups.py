"""Process groups for expert parallelism × data parallelism.

Legend: W world size, P expert-parallel group size, Q = W / P data-parallel group size.

Global rank ``r`` sits in expert-parallel group ``r // P`` (consecutive ranks, so an
expert group stays inside one node when P divides the ranks per node) at position
``r % P``, and in data-parallel group ``r % P`` together with the ranks that hold the
same experts. Token statistics (aux losses) and dense gradients are reduced over all W
ranks; expert gradients over the Q ranks of the data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["ExpertParallelGroups", "make_expert_parallel_groups"]


@dataclass(frozen=True)
class ExpertParallelGroups:
    """The two process groups a rank belongs to.

    Attributes:
        ep: Expert-parallel group: P ranks that together hold all experts and exchange
            token rows.
        dp: Data-parallel group: Q ranks that hold the same experts (replicas).
    """

    ep: ProcessGroup
    dp: ProcessGroup

    @property
    def ep_size(self) -> int:
        """P, the ranks sharing one copy of the experts."""
        return dist.get_world_size(self.ep)

    @property
    def ep_rank(self) -> int:
        """This rank's position in its expert-parallel group (which experts it holds)."""
        return dist.get_rank(self.ep)

    @property
    def dp_size(self) -> int:
        """Q, the replicas of each expert."""
        return dist.get_world_size(self.dp)

    @property
    def dp_rank(self) -> int:
        """This rank's position in its data-parallel group."""
        return dist.get_rank(self.dp)


def make_expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """Split the world into expert-parallel groups of ``ep_size`` ranks and their replicas.

    Every rank must call this, with the same ``ep_size`` (it creates every group, as
    ``torch.distributed.new_group`` requires).

    Args:
        ep_size: P, ranks per expert-parallel group; must divide the world size.

    Returns:
        This rank's expert-parallel and data-parallel groups.

    Raises:
        RuntimeError: If ``torch.distributed`` is not initialised.
        ValueError: If ``ep_size`` is not a positive divisor of the world size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("make_expert_parallel_groups needs torch.distributed initialised")
    world, rank = dist.get_world_size(), dist.get_rank()
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or world % ep_size:
        raise ValueError(
            f"ep_size must be a positive divisor of the world size {world}, got {ep_size!r}"
        )
    ep_group = dp_group = None
    for start in range(0, world, ep_size):
        group = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep_group = group
    for position in range(ep_size):
        group = dist.new_group(list(range(position, world, ep_size)))
        if rank % ep_size == position:
            dp_group = group
    # Every rank falls in exactly one group of each kind.
    assert ep_group is not None
    assert dp_group is not None
    return ExpertParallelGroups(ep_group, dp_group)
