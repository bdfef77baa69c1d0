"""``parallelize``: a model built from MoE layers inside PyTorch's distributed engines.

Legend: W world size, P expert-parallel group size, Q = W / P data-parallel group size,
E experts, L = E / P experts per rank.

One call applies, in this order, to any model built from MoE layers (:class:`~moeblocks.MoELayer`):

1. expert parallelism over groups of P ranks (:func:`.expert_parallelize`): each rank
   keeps L experts, an all-to-all carries the routed rows;
2. aux losses on global token statistics (:func:`.reduce_aux_losses`) and bias
   balancers that sum their loads over the world;
3. per block: activation checkpointing and ``torch.compile`` (both optional);
4. the engine: FSDP2 (``fully_shard``) or DDP.

What each engine shards (the torchtitan recipe for FSDP2)::

    FSDP2   dense parameters   sharded over all W ranks (one unit per block, one root)
            expert shards      sharded over the Q ranks holding the same experts (the
                               data-parallel complement of EP), gradients divided by W
    DDP     dense parameters   replicated, gradients averaged over W by DDP
            expert shards      replicated over Q, gradients reduced by
                               :meth:`ParallelModel.sync_gradients` (DDP cannot reduce
                               part of a model over another group)

The compute blocks never see a DTensor: FSDP2 hands every module its unsharded
parameters as plain tensors during forward and backward, and the expert-parallel
exchange works on plain tensors too. Sharded (DTensor) views exist only at the
checkpoint boundary (:mod:`.checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from moeblocks.balancing import balancers
from moeblocks.distributed.groups import ExpertParallelGroups, make_expert_parallel_groups
from moeblocks.distributed.losses import reduce_aux_losses
from moeblocks.distributed.sharding import (
    _all_reduce_mean,
    _split_params,
    clip_grad_norm_,
    expert_parallel_layers,
    expert_parallelize,
    local_shard,
)
from moeblocks.initialization import materialize
from moeblocks.layer import MoELayer
from moeblocks.routing import MoEOutput

__all__ = ["ENGINES", "ParallelConfig", "ParallelModel", "parallelize"]

ENGINES = ("fsdp", "ddp")


@dataclass(frozen=True)
class ParallelConfig:
    """How :func:`parallelize` spreads a model over the ranks.

    Attributes:
        engine: ``"fsdp"`` (FSDP2 ``fully_shard``: parameters, gradients and optimizer
            state sharded) or ``"ddp"`` (``DistributedDataParallel``: replicated).
        ep_size: P, ranks that share one copy of the experts (expert parallelism);
            must divide the world size and every layer's expert count. 1: no expert
            parallelism, experts are dense parameters to the engine.
        activation_checkpointing: Recompute each block's activations in backward
            (non-reentrant ``torch.utils.checkpoint`` semantics, applied per block).
        compile_blocks: ``torch.compile`` each block's forward (the engine's hooks
            stay outside the graph).
        compile_backend: The ``torch.compile`` backend (``"inductor"``, ``"aot_eager"``...).
        reshard_after_forward: FSDP2 frees each block's gathered parameters after its
            forward and gathers them again for backward (less memory, more traffic).
        blocks: Dotted name of the ``nn.ModuleList`` holding the model's repeated
            blocks (e.g. ``"blocks"``); None finds the first ``ModuleList`` whose
            entries hold MoE layers, else takes the MoE layers themselves.
    """

    engine: str = "fsdp"
    ep_size: int = 1
    activation_checkpointing: bool = False
    compile_blocks: bool = False
    compile_backend: str = "inductor"
    reshard_after_forward: bool = True
    blocks: str | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        ep = self.ep_size
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
            raise ValueError(f"ep_size must be an int >= 1, got {ep!r}")
        for name in ("activation_checkpointing", "compile_blocks", "reshard_after_forward"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(
                f"compile_backend must be a backend name, got {self.compile_backend!r}"
            )
        if self.blocks is not None and (not isinstance(self.blocks, str) or not self.blocks):
            raise ValueError(f"blocks must be a module name or None, got {self.blocks!r}")


class ParallelModel:
    """A model after :func:`parallelize`: what to call, and what the engine leaves to you.

    Attributes:
        module: Call this in training (the DDP wrapper, or the FSDP2 model itself).
        model: The model underneath (the same object as ``module`` under FSDP2); use it
            for attributes, evaluation and building the optimizer.
        config: The :class:`ParallelConfig` applied.
        groups: The expert-parallel and data-parallel groups (None when ``ep_size`` is 1).
        expert_mesh: 2-D device mesh ``("ep", "dp")`` of the expert shards, for
            sharded checkpoints (None without expert parallelism).
    """

    def __init__(
        self,
        module: nn.Module,
        model: nn.Module,
        config: ParallelConfig,
        groups: ExpertParallelGroups | None,
        expert_mesh: DeviceMesh | None,
    ) -> None:
        self.module = module
        self.model = model
        self.config = config
        self.groups = groups
        self.expert_mesh = expert_mesh

    def __repr__(self) -> str:
        return f"ParallelModel({self.config!r}, world={dist.get_world_size()})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)``."""
        return self.module(*args, **kwargs)

    def sync_gradients(self) -> None:
        """Finish the gradient reduction the engine does not do; call after ``backward``.

        FSDP2 reduces every gradient except those of 0-dim parameters (a cosine
        router's temperature), which it cannot shard: they stay replicated and are
        averaged over the world here. DDP averages the dense gradients; the expert
        shards, which DDP must ignore (it would average different experts of different
        ranks together), are summed here over their data-parallel group and divided by
        W, the gradient of the global mean loss (see
        :func:`~moeblocks.distributed.all_reduce_gradients`). A collective.
        """
        world = dist.get_world_size()
        if self.config.engine == "ddp" and self.groups is not None:
            _, experts = _split_params(self.model)
            _all_reduce_mean(experts, self.groups.dp, world)
        if self.config.engine == "fsdp":
            _all_reduce_mean(_scalars(self.model), None, world)

    def clip_grad_norm_(self, max_norm: float) -> Float[Tensor, ""]:
        """Clip the whole model's gradient norm in place; every rank gets the same norm.

        Call after :meth:`sync_gradients`. Under FSDP2 every element of the model lives
        on exactly one rank (dense shards over W, expert shards over Q inside P), so
        the squared norm is the world sum of the local shards' squared norms.

        Args:
            max_norm: Largest allowed norm (> 0; ``math.inf`` measures only).

        Returns:
            The norm before clipping (float32 scalar).

        Raises:
            ValueError: If ``max_norm`` is not a positive number.
        """
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        if self.config.engine == "ddp":
            if self.groups is not None:
                return clip_grad_norm_(self.model, max_norm, self.groups)
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).float()
        scalars = {id(p) for p in _scalars(self.model)}
        sharded, replicated = [], []
        for p in self.model.parameters():
            if p.grad is not None:
                (replicated if id(p) in scalars else sharded).append(local_shard(p.grad))
        device = _device(self.model)

        def sum_sq(grads: list[Tensor]) -> Tensor:
            zero = torch.zeros((), device=device, dtype=torch.float32)
            return sum((g.detach().float().square().sum() for g in grads), zero)

        sharded_sq = sum_sq(sharded)
        dist.all_reduce(sharded_sq)  # replicated scalars count once, not W times
        norm = (sharded_sq + sum_sq(replicated)).sqrt()
        grads = sharded + replicated
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
        return norm


def _scalars(model: nn.Module) -> list[nn.Parameter]:
    """0-dim trainable parameters: FSDP2 cannot shard them, so they stay replicated."""
    return [p for p in model.parameters() if p.ndim == 0 and p.requires_grad]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else local_shard(p).device


def _init_device(
    model: nn.Module, device: torch.device | str | None, groups: ExpertParallelGroups | None
) -> torch.device | None:
    """Where a meta-built model is materialised; None for a model not built on meta."""
    if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        return None
    if groups is not None:
        raise ValueError(
            "a meta-built model cannot be expert-parallelised yet (ep_size > 1): build it "
            "on a device, or use ep_size=1"
        )
    if device is not None:
        return torch.device(device)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _find_blocks(model: nn.Module, name: str | None) -> list[nn.Module]:
    """The repeated blocks that get their own FSDP2 unit, checkpointing and compile."""
    if name is not None:
        try:
            found = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"blocks names no submodule of the model: {name!r}") from err
        if not isinstance(found, nn.ModuleList):
            raise ValueError(
                f"blocks must name an nn.ModuleList, {name!r} is a {type(found).__name__}"
            )
        return list(found)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and any(
            isinstance(m, MoELayer) for block in module for m in block.modules()
        ):
            return list(module)
    return [m for m in model.modules() if isinstance(m, MoELayer) and m is not model]


def _register_records() -> None:
    """Let the engines see the tensors inside :class:`~moeblocks.MoEOutput`.

    FSDP2 gathers a block's parameters again for backward when a gradient reaches one
    of the block's output tensors; it finds them by flattening the output as a pytree.
    A block returns its aux losses inside an ``MoEOutput``, and their gradient (router
    parameters) may arrive before the hidden state's, so the record must be a pytree
    node, not an opaque leaf.
    """
    from torch.utils._pytree import SUPPORTED_NODES

    if MoEOutput not in SUPPORTED_NODES:
        torch.export.register_dataclass(MoEOutput, serialized_type_name="moeblocks.MoEOutput")


def _no_view_outputs(module: nn.Module, args: Any, output: Any) -> Any:
    """A forward hook: the unit's outputs that are views become tensors of their own.

    FSDP2 hangs its pre-backward hook (the all-gather before the unit's backward) on every
    output tensor; an in-place op on an output that is a *view* drops that hook. A
    block's ``MoEOutput.out`` is one (``MoELayer`` reshapes ``[T, D]`` to the input's
    shape), and code after the block may well update it in place (``moe.out += ...``).
    One copy of that ``[*batch, D]`` tensor per block and step removes the hazard, and
    FSDP2's warning with it. Registered to run before FSDP2's own post-forward hook.
    """
    from torch.utils._pytree import tree_map_only

    def own(t: Tensor) -> Tensor:
        return t.clone() if t._base is not None and t.requires_grad else t

    return tree_map_only(Tensor, own, output)


def _expert_mesh(groups: ExpertParallelGroups, device_type: str) -> DeviceMesh:
    """The ``("ep", "dp")`` mesh over the existing groups, ``mesh[p][q]`` a global rank.

    ``mesh[p][q]`` is the rank at expert-parallel position p and data-parallel position q.

    Expert ``e`` lives at ep position ``e // L``, so "ep" must be the outer mesh dim: a
    DTensor sharded on dim 0 over both dims then cuts E into P blocks first, and each
    block into Q pieces, exactly the FSDP2 shards of the expert-parallel shards.
    """
    where: list[tuple[int, int]] = [(0, 0)] * dist.get_world_size()
    dist.all_gather_object(where, (groups.ep_rank, groups.dp_rank))
    grid = torch.empty(groups.ep_size, groups.dp_size, dtype=torch.long)
    for rank, (p, q) in enumerate(where):
        grid[p, q] = rank
    return DeviceMesh.from_group(
        [groups.ep, groups.dp], device_type, mesh=grid, mesh_dim_names=("ep", "dp")
    )


def _compile_forward(block: nn.Module, backend: str) -> None:
    # The forward, not the module: FSDP2's and checkpointing's hooks run around it,
    # eagerly, while the block's own computation is compiled.
    block.forward = torch.compile(block.forward, backend=backend)  # type: ignore[method-assign]


def parallelize(
    model: nn.Module,
    config: ParallelConfig | None = None,
    *,
    groups: ExpertParallelGroups | None = None,
    device: torch.device | str | None = None,
) -> ParallelModel:
    """Apply expert parallelism, checkpointing, compile and FSDP2 or DDP to ``model``.

    Build the full model identically on every rank (same seed; load or seed weights
    first), or on ``meta`` with every rank seeded alike: FSDP2 then shards the meta
    parameters and each rank initialises only its shards to the unsharded model's
    values (:func:`~moeblocks.initialization.materialize`). Call this on every rank,
    then build the optimizer from ``result.model.parameters()``: expert shards and
    FSDP2's sharded parameters are new objects. In the loop::

        out = pm(x)                     # pm.module(x)
        loss.backward()
        pm.sync_gradients()             # what the engine leaves (DDP + EP only)
        norm = pm.clip_grad_norm_(1.0)  # the global norm
        optimizer.step(); optimizer.zero_grad()

    Each rank's loss should be the mean over its own tokens; with equal token counts
    per rank the averaged gradients are those of the mean over all ranks' tokens (the
    engines divide by W). Aux losses are computed on the global token statistics.

    Args:
        model: The model, modified in place (FSDP2 changes its class; its parameter
            names and ``state_dict`` keys stay as they were).
        config: What to apply; default :class:`ParallelConfig` (FSDP2, no EP).
        groups: Existing groups for expert parallelism; default: made with
            :func:`~moeblocks.distributed.make_expert_parallel_groups` from
            ``config.ep_size`` (a collective: every rank must call this).
        device: Where a ``meta``-built model is materialised (default: GPU under NCCL, else CPU).

    Returns:
        The :class:`ParallelModel`.

    Raises:
        RuntimeError: If ``torch.distributed`` is not initialised.
        ValueError: For an ``ep_size`` that does not divide the world or the experts or
            disagrees with ``groups``, a model without MoE layers and ``ep_size`` > 1, a
            ``blocks`` name that is not a ``ModuleList``, or ``ep_size`` > 1 on ``meta``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("parallelize needs torch.distributed initialised")
    config = ParallelConfig() if config is None else config
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"config must be a ParallelConfig, got {type(config).__name__}")
    blocks = _find_blocks(model, config.blocks)
    if groups is None and config.ep_size > 1:
        groups = make_expert_parallel_groups(config.ep_size)
    if groups is not None and groups.ep_size != config.ep_size:
        raise ValueError(
            f"groups have expert-parallel size {groups.ep_size}, config.ep_size is {config.ep_size}"
        )
    init_device = _init_device(model, device, groups)
    device_type = (init_device or _device(model)).type
    if groups is not None:
        expert_parallelize(model, groups.ep)
    reduce_aux_losses(model)
    for balancer in balancers(model):
        balancer.group = dist.group.WORLD  # every rank applies the same bias update
    for block in blocks:
        if config.activation_checkpointing:
            from torch.distributed._composable import checkpoint

            # No early stop: a recompute must replay every collective of the block
            # (all-to-all, aux-loss all-reduce), on every rank alike.
            checkpoint(block, early_stop=False)
        if config.compile_blocks:
            _compile_forward(block, config.compile_backend)
    expert_mesh = None if groups is None else _expert_mesh(groups, device_type)
    if config.engine == "fsdp":
        _fully_shard(model, blocks, groups, expert_mesh, config, device_type)
    if init_device is not None:
        materialize(model, init_device)  # after fully_shard: each rank's shards only
    if config.engine == "fsdp":
        return ParallelModel(model, model, config, groups, expert_mesh)
    return ParallelModel(_ddp(model), model, config, groups, expert_mesh)


def _fully_shard(
    model: nn.Module,
    blocks: list[nn.Module],
    groups: ExpertParallelGroups | None,
    expert_mesh: DeviceMesh | None,
    config: ParallelConfig,
    device_type: str,
) -> None:
    from torch.distributed.fsdp import fully_shard

    _register_records()
    world_mesh = DeviceMesh.from_group(dist.group.WORLD, device_type)
    reshard = config.reshard_after_forward
    # fully_shard refuses 0-dim parameters; they stay replicated, their gradients
    # averaged by ParallelModel.sync_gradients.
    scalars = set(_scalars(model))
    if groups is not None:
        assert expert_mesh is not None  # made with the groups
        for _, layer in expert_parallel_layers(model):
            # Inner units first: the expert shards over the ranks holding the same
            # experts. Their gradients already sum every ep rank's tokens (all-to-all
            # backward); dividing the dp sum by W, not Q, gives the global mean.
            fully_shard(layer.experts, mesh=expert_mesh["dp"], reshard_after_forward=reshard)
            layer.experts.set_gradient_divide_factor(float(dist.get_world_size()))
            if groups.dp_size > 1 and dist.get_backend(groups.dp) == "gloo":
                # gloo has no PREMUL_SUM: sum, then divide after the reduce-scatter. (On
                # one rank FSDP2 divides without a collective; forcing the sum there
                # would divide twice, torch 2.13.)
                layer.experts.set_force_sum_reduction_for_comms(True)
    for block in blocks:
        fully_shard(block, mesh=world_mesh, reshard_after_forward=reshard, ignored_params=scalars)
        block.register_forward_hook(_no_view_outputs, prepend=True)  # before FSDP2's hook
    # The root unit: embeddings, head, final norm.
    fully_shard(model, mesh=world_mesh, ignored_params=scalars)


def _ddp(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    experts = [
        f"{name}.experts.{p}" if name else f"experts.{p}"
        for name, layer in expert_parallel_layers(model)
        for p, _ in layer.experts.named_parameters()
    ]
    if experts:
        # Expert shards differ between ranks: DDP must neither broadcast nor average them.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
    device = _device(model)
    return DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        # Buffers (bias-balancer loads) are per-rank counts until the balancer's step.
        broadcast_buffers=False,
    )
