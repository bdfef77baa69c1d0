"""Placing experts on ranks: shard a bank, convert MoE layers, synchronise gradients.

Legend: E experts, P expert-parallel group size, L = E / P experts per rank, W world size.

An expert bank follows the stacked-weights convention when every parameter and buffer
has E as its leading dimension and ``num_experts`` is its only other record of E (true of
:class:`~moeblocks.SwiGLUExperts` and :class:`~moeblocks.GELUExperts`). Rank ``p`` of an
expert-parallel group holds experts ``[p·L, (p+1)·L)``.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
import torch.distributed as dist
from jaxtyping import Float
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from moeblocks.distributed.dispatch import AllToAllDispatcher
from moeblocks.distributed.groups import ExpertParallelGroups
from moeblocks.layer import MoELayer

__all__ = [
    "all_reduce_gradients",
    "clip_grad_norm_",
    "expert_parallel_layers",
    "expert_parallelize",
    "local_shard",
    "shard_experts",
]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def local_shard(t: Tensor) -> Tensor:
    """This rank's piece of ``t``: a DTensor's local shard, else ``t`` itself.

    The shard is a view: in-place ops on it write through to the DTensor.
    """
    return t.to_local() if hasattr(t, "to_local") else t


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def shard_experts(bank: ModuleT, rank: int, ep_size: int) -> ModuleT:
    """A copy of ``bank`` that holds only the experts of ``rank``.

    Args:
        bank: An expert bank with stacked weights (see the module docstring); unchanged.
        rank: Position in the expert-parallel group, in ``[0, ep_size)``.
        ep_size: P, the ranks the experts are spread over.

    Returns:
        A bank of the same class with ``num_experts = E / P``, holding copies of experts
        ``[rank·L, (rank+1)·L)`` (no storage shared with ``bank``).

    Raises:
        ValueError: If E is not divisible by ``ep_size``, ``rank`` is out of range, or a
            tensor of the bank does not have E as its leading dimension.
    """
    _check_int("ep_size", ep_size, 1)
    _check_int("rank", rank, 0)
    if rank >= ep_size:
        raise ValueError(f"rank must be in [0, {ep_size}), got {rank}")
    E = _check_int("bank.num_experts", getattr(bank, "num_experts", None), 1)
    if E % ep_size:
        raise ValueError(
            f"bank.num_experts ({E}) must be divisible by ep_size ({ep_size}) "
            "so every rank holds the same number of experts"
        )
    L = E // ep_size
    tensors = {**dict(bank.named_parameters()), **dict(bank.named_buffers())}
    for name, t in tensors.items():
        if t.ndim == 0 or t.shape[0] != E:
            raise ValueError(
                f"bank tensor {name!r} must have the {E} experts as its leading dim, "
                f"got shape {tuple(t.shape)}"
            )
    # Copy the module structure only; its tensors are replaced by slices below.
    shard = copy.deepcopy(bank, memo={id(t): t for t in tensors.values()})
    for name, t in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = shard.get_submodule(owner_name)
        piece = t.detach()[rank * L : (rank + 1) * L].clone()
        if isinstance(t, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(piece, requires_grad=t.requires_grad))
        else:
            setattr(owner, leaf, piece)
    shard.num_experts = L
    return shard


def expert_parallel_layers(module: nn.Module) -> list[tuple[str, MoELayer]]:
    """The expert-parallel MoE layers in ``module``, with their qualified names.

    A layer is expert-parallel when its dispatcher is an :class:`AllToAllDispatcher`.
    """
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, MoELayer) and isinstance(m.dispatcher, AllToAllDispatcher)
    ]


def expert_parallelize(module: ModuleT, ep_group: ProcessGroup | None = None) -> ModuleT:
    """Turn every MoE layer in ``module`` into an expert-parallel one, in place.

    Build the full model identically on every rank (same seed), then call this: each
    :class:`~moeblocks.MoELayer` keeps its router and losses, its expert bank is replaced
    by this rank's shard (:func:`shard_experts`) and its dispatcher by an
    :class:`AllToAllDispatcher` over ``ep_group`` that uses the old dispatcher for the
    local permute. Build the optimizer afterwards: the expert parameters are new objects.

    Args:
        module: A model holding one or more full (unsharded) MoE layers, or one layer.
        ep_group: The expert-parallel group (:func:`make_expert_parallel_groups`);
            ``None`` is the world group.

    Returns:
        ``module`` itself.

    Raises:
        ValueError: If ``module`` holds no MoE layer, a layer is already expert-parallel
            or its bank is not full, or E is not divisible by the group size.
    """
    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"module must contain an MoELayer, got a {type(module).__name__} without")
    for layer in layers:
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            raise ValueError("module holds an MoELayer that is already expert-parallel")
        if layer.experts.num_experts != layer.num_experts:
            raise ValueError(
                f"expert bank holds {layer.experts.num_experts} experts but the router "
                f"chooses among {layer.num_experts}: expert_parallelize needs the full bank"
            )
    dispatchers = [AllToAllDispatcher(ep_group, local=layer.dispatcher) for layer in layers]
    for layer, dispatcher in zip(layers, dispatchers, strict=True):
        dispatcher.local_experts(layer.num_experts)  # E % P check before any change
    for layer, dispatcher in zip(layers, dispatchers, strict=True):
        layer.experts = shard_experts(layer.experts, dispatcher.group_rank, dispatcher.group_size)
        layer.dispatcher = dispatcher
    return module


def _all_reduce_mean(params: list[nn.Parameter], group: ProcessGroup | None, divisor: int) -> None:
    """Sum the gradients of ``params`` over ``group``, divide by ``divisor``, one call per dtype."""
    by_kind: dict[tuple[str, str], list[nn.Parameter]] = {}
    for p in params:
        by_kind.setdefault((str(p.device), str(p.dtype)), []).append(p)
    for kind in sorted(by_kind):  # the same order on every rank
        group_params = by_kind[kind]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in group_params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= divisor
        for p, piece in zip(group_params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = piece.view_as(p).clone()


def _split_params(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable (dense, expert-shard) parameters, each in module order."""
    expert_ids = {
        id(p) for _, layer in expert_parallel_layers(module) for p in layer.experts.parameters()
    }
    trainable = [p for p in module.parameters() if p.requires_grad]
    return (
        [p for p in trainable if id(p) not in expert_ids],
        [p for p in trainable if id(p) in expert_ids],
    )


def all_reduce_gradients(module: nn.Module, groups: ExpertParallelGroups) -> None:
    """Average gradients over the data-parallel replicas of an expert-parallel model.

    Call after ``backward`` on every rank, in place of DDP (which would average the
    different experts of different ranks together). With W ranks each adding its local
    loss (task loss plus the group-reduced aux losses), the gradient of the global mean
    loss is ``Σ_ranks grad / W`` for every parameter:

    - dense parameters (router, attention, ...) are replicated on all W ranks: all-reduce
      over the world group, divide by W;
    - expert parameters of rank ``p``'s shard already hold, through the all-to-all
      backward, the gradients from every rank of its expert-parallel group: all-reduce
      over the data-parallel group, divide by W as well.

    A missing gradient counts as zero, so every rank makes the same collective calls.

    Args:
        module: The expert-parallelised model.
        groups: The groups it was built with (:func:`make_expert_parallel_groups`).
    """
    dense, experts = _split_params(module)
    world = dist.get_world_size()
    _all_reduce_mean(dense, None, world)
    _all_reduce_mean(experts, groups.dp, world)


def clip_grad_norm_(
    module: nn.Module, max_norm: float, groups: ExpertParallelGroups
) -> Float[Tensor, ""]:
    """Clip the global gradient norm of an expert-parallel model, in place.

    The counterpart of ``torch.nn.utils.clip_grad_norm_`` after
    :func:`all_reduce_gradients`: dense gradients are the same on every rank, while each
    rank of an expert-parallel group holds a different shard of the experts, so the norm
    of the whole model's gradient is ``sqrt(|g_dense|² + Σ_ep-ranks |g_experts|²)``. Every
    rank gets the same norm and scales by the same ``min(1, max_norm / (norm + 1e-6))``.
    A collective over the expert-parallel group.

    Args:
        module: The expert-parallelised model, its gradients already all-reduced.
        max_norm: Largest allowed norm (> 0).
        groups: The groups it was built with.

    Returns:
        The total norm before clipping (float32 scalar).

    Raises:
        ValueError: If ``max_norm`` is not a positive number.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    dense, experts = _split_params(module)
    device = next(module.parameters()).device

    def sum_sq(params: list[nn.Parameter]) -> Tensor:
        squares = [p.grad.detach().float().square().sum() for p in params if p.grad is not None]
        return torch.stack(squares).sum() if squares else torch.zeros((), device=device)

    dense_sq, expert_sq = sum_sq(dense), sum_sq(experts)
    dist.all_reduce(expert_sq, group=groups.ep)
    norm = (dense_sq + expert_sq).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in dense + experts:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return norm
