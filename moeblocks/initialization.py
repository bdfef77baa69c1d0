"""Construction apart from initialisation: build on ``meta``, then materialise.

Every block with parameters or state buffers allocates them in ``__init__`` and then
calls its own ``reset_parameters()``, which initialises only that module's direct
parameters and buffers, in place. So a model can be built without memory::

    with torch.device("meta"):
        model = build()            # shapes only, no storage, no random draw
    materialize(model, "cpu")      # to_empty, then init_weights

and ``init_weights`` draws the same random numbers in the same order as eager
construction: under the same seed the tensors are bit for bit those of ``build()`` on
the device. The order is post-order over the module tree (children in registration
order, then the parent), which is the order eager construction initialises in when a
parent builds its children first and then refines them (a model-wide recipe such as the
SRA model's GPT-2 init is the parent's ``reset_parameters`` and runs after its
children's defaults, as in eager construction).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["init_weights", "materialize"]


def _post_order(module: nn.Module, seen: set[int]) -> Iterator[nn.Module]:
    if id(module) in seen:
        return
    seen.add(id(module))
    for child in module.children():
        yield from _post_order(child, seen)
    yield module


def _sharded(module: nn.Module) -> dict[str, Tensor]:
    """The module's direct parameters and buffers that are DTensors (FSDP2 shards)."""
    if not torch.distributed.is_available():
        return {}
    from torch.distributed.tensor import DTensor

    own = {**module._parameters, **module._buffers}
    return {n: t for n, t in own.items() if isinstance(t, DTensor)}


def _reset_sharded(
    module: nn.Module, reset: Callable[[], None], sharded: dict[str, Tensor]
) -> None:
    """Run ``reset`` on full-size stand-ins of the sharded tensors; keep each local shard.

    Every rank draws the full tensor, in the order of eager construction, and keeps its
    own slice, so a sharded model initialises bit for bit as an unsharded one. At most
    one module's own tensors exist in full at a time, never the whole model.
    """
    from torch.distributed.tensor import distribute_tensor

    full: dict[str, Tensor] = {}
    for name, t in sharded.items():
        empty = torch.empty(t.shape, dtype=t.dtype, device=t.to_local().device)
        if name in module._parameters:
            full[name] = module._parameters[name] = nn.Parameter(empty, t.requires_grad)
        else:
            full[name] = module._buffers[name] = empty
    try:
        reset()
    finally:
        for name, t in sharded.items():
            where = module._parameters if name in module._parameters else module._buffers
            where[name] = t  # type: ignore[assignment]
    for name, t in sharded.items():
        # src_data_rank=None: every rank holds the same full tensor, so each slices its
        # own shard locally, without a collective.
        local = distribute_tensor(
            full[name].detach(), t.device_mesh, t.placements, src_data_rank=None
        )
        t.to_local().copy_(local.to_local())


def init_weights(model: nn.Module) -> nn.Module:
    """Call ``reset_parameters()`` of every module of ``model``, children before parents.

    Modules without ``reset_parameters`` are skipped; a module reached twice (shared)
    is reset once. A module whose own tensors are FSDP2 shards (DTensors) is reset on
    full-size stand-ins, and each rank keeps its shard (see :func:`materialize`). Every
    rank must run it with the same random state. In place; returns ``model``.
    """
    with torch.no_grad():
        for module in _post_order(model, set()):
            reset = getattr(module, "reset_parameters", None)
            if not callable(reset):
                continue
            sharded = _sharded(module)
            if sharded:
                _reset_sharded(module, reset, sharded)
            else:
                reset()
    return model


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give a ``meta``-built model storage on ``device``, then :func:`init_weights`.

    ``to_empty`` runs with ``torch.__future__``'s swap-on-conversion set, so a parameter
    shared by two modules (tied embeddings) stays one object; it also keeps FSDP2's
    sharded parameters the ones FSDP2 manages. After ``fully_shard`` each rank
    allocates only its shards, and :func:`init_weights` fills them with the values an
    unsharded model would hold (the torchtitan flow: build on ``meta``, parallelise,
    materialise). In place; returns ``model``.
    """
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    return init_weights(model)
