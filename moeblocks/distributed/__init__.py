"""Expert parallelism over ``torch.distributed``: experts spread over ranks, tokens exchanged.

With E experts over an expert-parallel group of P ranks, each rank holds E / P experts;
an :class:`AllToAllDispatcher` sends every routed token copy to the rank of its expert
and the results back, so an unchanged :class:`~moeblocks.MoELayer` runs the local shard
of the expert bank. Typical use, after ``init_process_group`` (e.g. under ``torchrun``)::

    groups = make_expert_parallel_groups(ep_size)
    model = build_model(seed=0)                # the full model, identical on every rank
    expert_parallelize(model, groups.ep)       # shard experts, all-to-all dispatch
    reduce_aux_losses(model)                   # aux losses see the global batch
    ...                                        # forward, loss.backward()
    all_reduce_gradients(model, groups)        # instead of DDP
    clip_grad_norm_(model, 1.0, groups)        # the whole model's norm
    state = full_state_dict(model)             # loads on any world size
    load_full_state_dict(model, state)

Or, with PyTorch's engines, in one call: ``pm = parallelize(model,
ParallelConfig(engine="fsdp", ep_size=P))`` adds FSDP2 (or DDP), activation
checkpointing and per-block compile, and ``save_sharded`` / ``load_sharded`` write and
read sharded (DCP) checkpoints at any world size.

Modules: :mod:`.parallel` (``parallelize``: EP, FSDP2 or DDP, checkpointing, compile),
:mod:`.comm` (differentiable collectives), :mod:`.dispatch` (the dispatcher and
its layout), :mod:`.groups` (process groups), :mod:`.sharding` (sharding, gradient
synchronisation and clipping), :mod:`.checkpoint` (world-size-independent state dicts),
:mod:`.losses` (group-reduced aux losses).
"""

from moeblocks.distributed.checkpoint import full_state_dict as full_state_dict
from moeblocks.distributed.checkpoint import (
    load_full_optimizer_state as load_full_optimizer_state,
)
from moeblocks.distributed.checkpoint import load_full_state_dict as load_full_state_dict
from moeblocks.distributed.checkpoint import load_sharded as load_sharded
from moeblocks.distributed.checkpoint import save_sharded as save_sharded
from moeblocks.distributed.checkpoint import sharded_state_dict as sharded_state_dict
from moeblocks.distributed.comm import all_reduce_sum as all_reduce_sum
from moeblocks.distributed.comm import all_to_all_rows as all_to_all_rows
from moeblocks.distributed.dispatch import AllToAllDispatcher as AllToAllDispatcher
from moeblocks.distributed.dispatch import ExpertParallelLayout as ExpertParallelLayout
from moeblocks.distributed.groups import ExpertParallelGroups as ExpertParallelGroups
from moeblocks.distributed.groups import make_expert_parallel_groups as make_expert_parallel_groups
from moeblocks.distributed.losses import GroupReducedLoss as GroupReducedLoss
from moeblocks.distributed.losses import global_mean_expert_probs as global_mean_expert_probs
from moeblocks.distributed.losses import global_token_stats as global_token_stats
from moeblocks.distributed.losses import reduce_aux_losses as reduce_aux_losses
from moeblocks.distributed.parallel import ParallelConfig as ParallelConfig
from moeblocks.distributed.parallel import ParallelModel as ParallelModel
from moeblocks.distributed.parallel import parallelize as parallelize
from moeblocks.distributed.sharding import all_reduce_gradients as all_reduce_gradients
from moeblocks.distributed.sharding import clip_grad_norm_ as clip_grad_norm_
from moeblocks.distributed.sharding import expert_parallel_layers as expert_parallel_layers
from moeblocks.distributed.sharding import expert_parallelize as expert_parallelize
from moeblocks.distributed.sharding import local_shard as local_shard
from moeblocks.distributed.sharding import shard_experts as shard_experts

__all__ = [
    "AllToAllDispatcher",
    "ExpertParallelGroups",
    "ExpertParallelLayout",
    "GroupReducedLoss",
    "ParallelConfig",
    "ParallelModel",
    "all_reduce_gradients",
    "all_reduce_sum",
    "all_to_all_rows",
    "clip_grad_norm_",
    "expert_parallel_layers",
    "expert_parallelize",
    "full_state_dict",
    "global_mean_expert_probs",
    "global_token_stats",
    "load_full_optimizer_state",
    "load_full_state_dict",
    "load_sharded",
    "local_shard",
    "make_expert_parallel_groups",
    "parallelize",
    "reduce_aux_losses",
    "save_sharded",
    "shard_experts",
    "sharded_state_dict",
]
