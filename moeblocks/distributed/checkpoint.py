"""Checkpoints that load on any world size: full (gathered) or sharded (DCP).

Legend: E experts, P expert-parallel group size, Q data-parallel group size,
L = E / P experts per rank.

Two forms, both keyed and shaped like the model on one process:

- The *full* state dict (:func:`full_state_dict`) gathers the experts, so a run saved
  on 4 ranks loads on 1 with a plain ``load_state_dict`` and vice versa. For one
  process, ``eval`` and inspection.
- The *sharded* state (:func:`sharded_state_dict`, :func:`save_sharded`,
  :func:`load_sharded`) is what ``torch.distributed.checkpoint`` (DCP) writes: each
  rank writes only its own shards, in parallel, and any world size reads back the
  pieces it needs (1 process included, without a process group). Expert shards
  appear in it as DTensors of the global shape ``[E, ...]`` over an ``("ep", "dp")``
  mesh, FSDP2 shards as the DTensors they are, replicated tensors as plain tensors.

Expert counts are checked on both sides: a checkpoint never loads with an expert
duplicated or dropped.

Fault tests place kills at named points of a save with :data:`FAULT_ENV`
(:func:`fault_point`); the variable is unset in every real run, where the points do
nothing.
"""

from __future__ import annotations

import collections
import os
import signal
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from moeblocks.distributed.comm import collective_timeout
from moeblocks.distributed.dispatch import AllToAllDispatcher
from moeblocks.distributed.sharding import expert_parallel_layers, local_shard
from moeblocks.layer import MoELayer

__all__ = [
    "FAULT_ENV",
    "fault_point",
    "full_state_dict",
    "load_full_optimizer_state",
    "load_full_state_dict",
    "load_sharded",
    "save_sharded",
    "sharded_state_dict",
]


FAULT_ENV = "MOEBLOCKS_FAULT"
_FAULT_POINTS = ("dcp-write", "dcp-finish", "publish")
# Times this process reached each point: a fault test's only state, read from nothing else.
_reached: collections.Counter[str] = collections.Counter()


def _fault_spec(name: str) -> str | None:
    """The action :data:`FAULT_ENV` asks for at point ``name`` on this rank, else None.

    The variable reads ``POINT@RANK[#N][:ACTION]``: the ``N``-th time (default 1) that
    this process reaches ``POINT`` (one of ``dcp-write``, inside
    DCP's write of this rank's shard file; ``dcp-finish``, rank 0 about to write DCP's
    ``.metadata``; ``publish``, the SRA save after the shards are written, before the
    checkpoint is published) on global rank ``RANK``. ACTION ``kill`` (default):
    SIGKILL; ``hang``: sleep for three collective timeouts (a rank stuck outside any
    collective while the others wait, which then goes on and fails on its own); a number
    in [0, 1) at ``dcp-write``: cut this rank's shard file to that fraction of its bytes,
    then SIGKILL (a kill in the middle of writing it).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    point, _, rest = spec.partition("@")
    where, _, action = rest.partition(":")
    rank_text, _, nth = where.partition("#")
    if (
        point not in _FAULT_POINTS
        or not rank_text.isdigit()
        or not (nth or "1").isdigit()
        or not (action in ("", "kill", "hang") or _is_fraction(action))
    ):
        raise ValueError(
            f"{FAULT_ENV} must read POINT@RANK[#N][:ACTION] with POINT one of {_FAULT_POINTS}, "
            f"got {spec!r}"
        )
    rank = dist.get_rank() if _distributed() else 0
    if point != name or int(rank_text) != rank:
        return None
    _reached[name] += 1
    return (action or "kill") if _reached[name] == int(nth or "1") else None


def _is_fraction(text: str) -> bool:
    try:
        return 0.0 <= float(text) < 1.0
    except ValueError:
        return False


def fault_point(name: str) -> None:
    """A named point of a save where a fault test may stop this process (see :data:`FAULT_ENV`).

    Does nothing unless the variable names this point and this rank.
    """
    _fault(_fault_spec(name))


def _fault(action: str | None, shards: str | None = None) -> None:
    """Carry out a fault action; a fraction first cuts this rank's files in ``shards``."""
    if action is None:
        return
    if action == "hang":
        time.sleep(3 * collective_timeout().total_seconds())
        return
    if action != "kill" and shards is not None:
        rank = dist.get_rank() if _distributed() else 0
        for file in os.scandir(shards):
            if file.name.startswith(f"__{rank}_"):  # DCP names each rank's file so
                os.truncate(file.path, int(float(action) * file.stat().st_size))
    os.kill(os.getpid(), signal.SIGKILL)


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


# --- sharded (DCP) -------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _expert_prefixes(model: nn.Module) -> dict[str, int]:
    """``"<layer>.experts."`` -> E, for every expert-parallel layer."""
    return {
        (f"{name}.experts." if name else "experts."): _sharding(name, layer)[0]
        for name, layer in expert_parallel_layers(model)
    }


def _global_expert_view(t: Tensor, num_experts: int, mesh: DeviceMesh) -> Tensor:
    """An expert shard as a DTensor of the global shape ``[E, ...]`` over ``("ep", "dp")``.

    Dim 0 is cut over "ep" first (rank p holds experts ``[p·L, (p+1)·L)``), then, for a
    FSDP2 shard, its piece over "dp" as FSDP2 placed it; without FSDP2 the shard is the
    same on every "dp" rank (replicated).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if _is_dtensor(t):
        local, inner = t.to_local(), t.placements[0]  # type: ignore[attr-defined]
    else:
        local, inner = t, Replicate()
    shape = torch.Size((num_experts, *t.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0), inner], shape=shape, stride=stride)


def _param_names(model: nn.Module) -> dict[int, str]:
    """``id(param)`` -> its name (the first one, for tied parameters)."""
    return {id(p): name for name, p in model.named_parameters()}


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the state of every parameter that has none, leaving the parameters as they are.

    DCP loads into existing tensors, and an optimizer makes its state on its first step:
    one step with zero gradients and learning rate 0 makes it.
    """
    missing = [p for g in optimizer.param_groups for p in g["params"] if p not in optimizer.state]
    if not missing:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for p in missing:
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
    for p in missing:
        p.grad = None


def sharded_state_dict(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    expert_mesh: DeviceMesh | None = None,
) -> dict[str, Any]:
    """The DCP view of a model (and its optimizer): ``{"model": ..., "optim": ...}``.

    Keys are the one-process names (``model.<name>``; ``optim.state.<name>.<key>`` and
    ``optim.param_groups`` with parameter names instead of indices). Tensors share
    storage with the model and optimizer, so DCP loads into them in place; an optimizer
    without state gets it first (zero step). A collective when the model is parallel.

    Args:
        model: The model: plain, FSDP2-sharded or expert-parallel (under DDP, the module
            inside the wrapper).
        optimizer: Its optimizer, built from ``model.parameters()``; None: weights only.
        expert_mesh: The ``("ep", "dp")`` mesh of the expert shards
            (:attr:`~moeblocks.distributed.ParallelModel.expert_mesh`); needed when the
            model is expert-parallel.

    Returns:
        The nested state dict to give ``torch.distributed.checkpoint.save`` or ``load``.

    Raises:
        ValueError: If the model is expert-parallel and ``expert_mesh`` is None.
    """
    experts = _expert_prefixes(model)
    if experts and expert_mesh is None:
        raise ValueError("the model is expert-parallel: pass its expert_mesh (ParallelModel)")

    def view(name: str, t: Any) -> Any:
        for prefix, E in experts.items():
            if name.startswith(prefix) and isinstance(t, Tensor) and t.ndim:
                assert expert_mesh is not None
                return _global_expert_view(t, E, expert_mesh)
        return t

    state: dict[str, Any] = {
        "model": {name: view(name, t) for name, t in model.state_dict().items()}
    }
    if optimizer is not None:
        _init_optimizer_state(optimizer)
        names = _param_names(model)
        groups = []
        per_param: dict[str, dict[str, Any]] = {}
        for group in optimizer.param_groups:
            try:
                params = [names[id(p)] for p in group["params"]]
            except KeyError as err:
                raise ValueError("optimizer holds a parameter that is not the model's") from err
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
            for p, name in zip(group["params"], params, strict=True):
                per_param[name] = {k: view(name, v) for k, v in optimizer.state[p].items()}
        state["optim"] = {"state": per_param, "param_groups": groups}
    return state


def _write_back(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Copy loaded views into the model and optimizer where they do not share storage."""
    live_model = model.state_dict()
    with torch.no_grad():
        for name, loaded in state["model"].items():
            _copy_into(live_model[name], loaded)
        if state["model"]:
            # DCP wrote into the tensors directly; loading the model's own state once
            # more runs the modules' load hooks, which keep Python attributes in step
            # with buffers (a cosine scorer's "seeded", a k schedule's step).
            model.load_state_dict(model.state_dict())
        if optimizer is None or "optim" not in state:
            return
        params = {id(p): p for g in optimizer.param_groups for p in g["params"]}
        by_name = {name: params[i] for i, name in _param_names(model).items() if i in params}
        for name, entries in state["optim"]["state"].items():
            live = optimizer.state[by_name[name]]
            for key, loaded in entries.items():
                if isinstance(live.get(key), Tensor):
                    _copy_into(live[key], loaded)
                else:
                    live[key] = loaded
        saved_groups = state["optim"]["param_groups"]
        for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})


def _copy_into(target: Tensor, loaded: Any) -> None:
    dst, src = local_shard(target), local_shard(loaded)
    if dst.data_ptr() != src.data_ptr() or dst.shape != src.shape:
        dst.copy_(src)


def _writer(path: str) -> Any:
    """DCP's file writer (each file ``fsync``-ed), with the fault points of a save."""
    import torch.distributed.checkpoint as dcp

    class Writer(dcp.FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            written = super().write_data(plan, planner)
            _fault(_fault_spec("dcp-write"), path)
            return written

        def finish(self, metadata: Any, results: Any) -> None:
            _fault(_fault_spec("dcp-finish"))
            super().finish(metadata, results)

    return Writer(path, sync_files=True)


def save_sharded(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    expert_mesh: DeviceMesh | None = None,
) -> None:
    """Write the sharded state (:func:`sharded_state_dict`) to folder ``path`` with DCP.

    Every rank writes its own shards (one file per rank, each ``fsync``-ed); rank 0
    writes the ``.metadata`` file that makes the folder loadable, last. A collective.
    """
    import torch.distributed.checkpoint as dcp

    state = sharded_state_dict(model, optimizer, expert_mesh=expert_mesh)
    dcp.save(state, storage_writer=_writer(os.fspath(path)), no_dist=not _distributed())


def load_sharded(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    expert_mesh: DeviceMesh | None = None,
) -> None:
    """Load a DCP folder written by :func:`save_sharded` at any world size into ``model``.

    Each rank reads the pieces of its own shards; one process without a process group
    reads everything. With ``optimizer``, its state and hyperparameters load too.

    Raises:
        RuntimeError: From DCP, when the folder lacks a key or a shape differs.
    """
    import torch.distributed.checkpoint as dcp

    state = sharded_state_dict(model, optimizer, expert_mesh=expert_mesh)
    reader = dcp.FileSystemReader(os.fspath(path))
    with warnings.catch_warnings():
        # DCP warns on every load without a process group, the case one process is for.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=not _distributed())
    _write_back(model, optimizer, state)


def load_full_optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state_dict: Mapping[str, Any],
    *,
    expert_mesh: DeviceMesh | None = None,
) -> None:
    """Load a one-process ``optimizer.state_dict()`` into a parallel model's optimizer.

    The saved state is indexed by parameter position, the order of the optimizer's
    param groups, which :func:`~moeblocks.distributed.parallelize` leaves unchanged.
    Each rank takes its piece of every tensor (its experts, its FSDP2 shard), without
    communication.

    Raises:
        ValueError: If the saved state has another number of parameters.
    """
    from torch.distributed.tensor import distribute_tensor

    view = sharded_state_dict(model, optimizer, expert_mesh=expert_mesh)["optim"]
    names = [n for g in view["param_groups"] for n in g["params"]]
    saved_groups = state_dict["param_groups"]
    if sum(len(g["params"]) for g in saved_groups) != len(names):
        raise ValueError(
            f"state_dict has {sum(len(g['params']) for g in saved_groups)} parameters, "
            f"the optimizer {len(names)}"
        )
    with torch.no_grad():
        for i, name in enumerate(names):
            for key, full in state_dict["state"].get(i, {}).items():
                target = view["state"][name].get(key)
                if _is_dtensor(target) and isinstance(full, Tensor):
                    piece = distribute_tensor(
                        full.to(target.device),
                        target.device_mesh,
                        target.placements,
                        src_data_rank=None,  # every rank holds the full tensor: slice it
                    )
                    view["state"][name][key] = piece
                else:
                    view["state"][name][key] = full
        for group, saved in zip(view["param_groups"], saved_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
    _write_back(model, optimizer, {"model": {}, "optim": view})
