"""Collect per-layer routing records of any moeblocks model over an evaluation set.

Legend: B batch, S sequence length, T tokens (all batches flattened), E experts,
K experts per token, L MoE layers.

The metric functions of :mod:`moeblocks.inspect` read a :class:`RoutingSet`: one
:class:`~moeblocks.Routing` per MoE layer, concatenated over every batch, plus the input
token id of every row. A model only needs a *forward function* ``ids_BS -> routings``;
:func:`sra_forward` builds one for the SRA transformer (its output already carries the
records) and :func:`capture_routings` builds one for any module that contains
:class:`~moeblocks.MoELayer` s, by reading each layer's returned ``MoEOutput``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor, nn

from moeblocks.layer import MoELayer
from moeblocks.routing import MoEOutput, Routing

__all__ = [
    "ForwardFn",
    "RoutingSet",
    "capture_routings",
    "collect_routing",
    "concat_routings",
    "sra_forward",
]

ForwardFn = Callable[[Tensor], Sequence[Routing]]
"""``ids_BS -> one Routing per MoE layer`` (rows in flattened ``[B, S]`` order)."""


@dataclass(frozen=True)
class RoutingSet:
    """Routing records of every MoE layer over an evaluation set, on the CPU.

    Attributes:
        layers: One record per MoE layer in depth order; row ``t`` of each is token ``t``.
        token_ids: Input token id of every row.
        seq_len: S of the batches the rows came from (row ``t`` is position
            ``t % seq_len`` of sequence ``t // seq_len``).
    """

    layers: tuple[Routing, ...]
    token_ids: Int[Tensor, " T"]
    seq_len: int

    @property
    def num_layers(self) -> int:
        """L, the number of MoE layers."""
        return len(self.layers)

    @property
    def num_tokens(self) -> int:
        """T, the number of collected tokens."""
        return int(self.token_ids.shape[0])


def concat_routings(records: Sequence[Routing]) -> Routing:
    """Concatenate routing records of one layer along the token axis (same E)."""
    if not records:
        raise ValueError("records must hold at least one Routing, got none")
    E = records[0].num_experts
    for r in records:
        if r.num_experts != E:
            raise ValueError(f"all records must have E={E} experts, got {r.num_experts}")
    slots = None
    if any(r.slots is not None for r in records):  # dynamic k: fixed-k records are all real
        slots = torch.cat([r.k_per_token.new_ones(r.experts.shape, dtype=torch.bool)
                           if r.slots is None else r.slots for r in records])  # fmt: skip
    return Routing(
        torch.cat([r.scores for r in records]),
        torch.cat([r.probs for r in records]),
        torch.cat([r.experts for r in records]),
        torch.cat([r.weights for r in records]),
        slots=slots,
    )


def _to_cpu(r: Routing) -> Routing:
    return Routing(
        r.scores.detach().float().cpu(),
        r.probs.detach().float().cpu(),
        r.experts.detach().cpu(),
        r.weights.detach().float().cpu(),
        slots=None if r.slots is None else r.slots.cpu(),
    )


@torch.no_grad()
def collect_routing(forward: ForwardFn, batches: Iterable[Int[Tensor, "B S"]]) -> RoutingSet:
    """Run ``forward`` over token batches and gather every layer's routing record.

    Args:
        forward: ``ids_BS -> routings`` (see :func:`sra_forward`, :func:`capture_routings`).
            Put the model in eval mode first; it is called under ``torch.no_grad``.
        batches: Token-id batches ``[B, S]`` (all with the same S).

    Returns:
        The :class:`RoutingSet`, moved to the CPU in float32.
    """
    per_layer: list[list[Routing]] = []
    ids: list[Tensor] = []
    seq_len = 0
    for ids_BS in batches:
        if ids_BS.ndim != 2:
            raise ValueError(f"batches must be [B, S] token ids, got shape {tuple(ids_BS.shape)}")
        if seq_len and ids_BS.shape[1] != seq_len:
            raise ValueError(f"all batches must have S={seq_len}, got {ids_BS.shape[1]}")
        seq_len = int(ids_BS.shape[1])
        routings = list(forward(ids_BS))
        if not per_layer:
            per_layer = [[] for _ in routings]
        if len(routings) != len(per_layer):
            raise ValueError(f"forward returned {len(routings)} records, expected {len(per_layer)}")
        for store, r in zip(per_layer, routings, strict=True):
            if r.num_tokens != ids_BS.numel():
                raise ValueError(
                    f"a routing record has {r.num_tokens} rows for a batch of {ids_BS.numel()} "
                    "tokens; forward must route every position of [B, S] in flattened order"
                )
            store.append(_to_cpu(r))
        ids.append(ids_BS.reshape(-1).long().cpu())
    if not ids:
        raise ValueError("batches was empty")
    layers = tuple(concat_routings(store) for store in per_layer)
    return RoutingSet(layers, torch.cat(ids), seq_len)


def sra_forward(model: nn.Module, k: int | None = None) -> ForwardFn:
    """Forward function of an :class:`~moeblocks.sra.SRATransformer` (records from its output).

    Args:
        model: The SRA model (any module whose output has a ``routings`` tuple).
        k: Experts per token for every layer; None follows the schedule.
    """

    def forward(ids_BS: Tensor) -> Sequence[Routing]:
        device = next(model.parameters()).device
        return model(ids_BS.to(device), k=k).routings

    return forward


@contextmanager
def capture_routings(
    model: nn.Module, call: Callable[[Tensor], object] | None = None
) -> Iterator[ForwardFn]:
    """Forward function for any module containing :class:`~moeblocks.MoELayer` s.

    Inside the ``with`` block, forward hooks read the ``MoEOutput`` each layer returns
    (the hooks only read the returned record; they are removed on exit). Layers are
    reported in the order they ran.

    Args:
        model: The model.
        call: How to run the model on ``ids_BS`` (default ``model(ids_BS)``).

    Yields:
        A forward function ``ids_BS -> routings``.
    """
    seen: list[Routing] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, MoEOutput):
            seen.append(output.routing)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MoELayer)]

    def forward(ids_BS: Tensor) -> Sequence[Routing]:
        seen.clear()
        (call or model)(ids_BS)
        out = list(seen)
        seen.clear()
        return out

    try:
        yield forward
    finally:
        for h in handles:
            h.remove()
