"""Checkpoints that load on any world size: gather experts on save, reshard on load.

Legend: E experts, P expert-parallel group size, L = E / P experts per rank.

The *full* state dict of an expert-parallel model has exactly the keys and shapes of the
same model on one process, so a run saved on 4 ranks loads on 1 (with a plain
``load_state_dict``) and vice versa. Expert counts are checked on both sides: a
checkpoint never loads with an expert duplicated or dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moeblocks.distributed.dispatch import AllToAllDispatcher
from moeblocks.distributed.sharding import expert_parallel_layers
from moeblocks.layer import MoELayer

__all__ = ["full_state_dict", "load_full_state_dict"]


def _sharding(name: str, layer: MoELayer) -> tuple[int, int, AllToAllDispatcher]:
    """E, L and the dispatcher of one expert-parallel layer, checked."""
    dispatcher = layer.dispatcher
    assert isinstance(dispatcher, AllToAllDispatcher)  # expert_parallel_layers picks these
    E, L, P = layer.num_experts, layer.experts.num_experts, dispatcher.group_size
    if L * P != E:
        raise ValueError(
            f"layer {name!r}: {P} ranks × {L} local experts = {L * P}, but its router "
            f"chooses among {E} experts"
        )
    return E, L, dispatcher


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The state dict of ``module`` as one process holding every expert would have it.

    Expert tensors of expert-parallel layers are all-gathered over each layer's group and
    concatenated in rank order; everything else is this rank's (replicated) value. A
    collective: every rank of the expert-parallel groups must call it. Save the result
    from one rank.

    Args:
        module: A model, expert-parallel or not (then this is its ``state_dict()``).

    Returns:
        Detached tensors, keyed like the unsharded model's state dict.

    Raises:
        ValueError: If a layer's shards do not add up to the router's expert count.
    """
    state = module.state_dict()
    for name, layer in expert_parallel_layers(module):
        _, _, dispatcher = _sharding(name, layer)
        prefix = f"{name}.experts." if name else "experts."
        for key, t in layer.experts.state_dict(prefix=prefix).items():
            pieces = [torch.empty_like(t) for _ in range(dispatcher.group_size)]
            dist.all_gather(pieces, t.contiguous(), group=dispatcher.group)
            state[key] = torch.cat(pieces)
    return state


def load_full_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a full state dict (from :func:`full_state_dict` or one process) into ``module``.

    Each expert-parallel layer takes its rank's slice ``[rank·L, (rank+1)·L)`` of every
    expert tensor; the rest loads as is. Loading is strict: missing or unexpected keys and
    wrong shapes raise. Needs no communication.

    Args:
        module: A model, expert-parallel or not.
        state_dict: Tensors keyed like the unsharded model's state dict.

    Raises:
        ValueError: If an expert tensor does not hold exactly the router's E experts.
        RuntimeError: From ``load_state_dict``, for missing, unexpected or misshapen keys.
    """
    local = dict(state_dict)
    for name, layer in expert_parallel_layers(module):
        E, L, dispatcher = _sharding(name, layer)
        rank = dispatcher.group_rank
        prefix = f"{name}.experts." if name else "experts."
        for key in layer.experts.state_dict(prefix=prefix):
            if key not in state_dict:
                continue  # reported as missing by the strict load below
            t = state_dict[key]
            if t.ndim == 0 or t.shape[0] != E:
                raise ValueError(
                    f"state_dict[{key!r}] must hold the layer's {E} experts along dim 0, "
                    f"got shape {tuple(t.shape)}"
                )
            local[key] = t[rank * L : (rank + 1) * L]
    module.load_state_dict(local, strict=True)
