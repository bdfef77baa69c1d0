"""Dispatchers by name: the one module that knows every backend.

Legend: none (no tensors here).

:func:`make_dispatcher` sits above :mod:`moeblocks.dispatch` (the protocol and the torch
reference) and :mod:`moeblocks.triton_dispatch` (the Triton backends), so neither of
those imports the other's upward neighbour. The Triton kernels themselves are still
imported only when a Triton dispatcher first moves tensors.
"""

from __future__ import annotations

from moeblocks.dispatch import Dispatcher, TorchDispatcher
from moeblocks.triton_dispatch import AutoDispatcher, TritonDispatcher

__all__ = ["make_dispatcher"]


def make_dispatcher(name: str = "auto", pad_to: int = 1) -> Dispatcher:
    """Build a dispatcher by name.

    Args:
        name: ``"torch"`` for :class:`TorchDispatcher`; ``"triton"`` for the Triton
            kernels (needs CUDA tensors, or ``TRITON_INTERPRET=1`` on CPU); ``"auto"``
            for a dispatcher that takes Triton on CUDA tensors and the torch reference
            on CPU tensors.
        pad_to: Segment alignment, see :class:`TorchDispatcher`.
    """
    if name == "torch":
        return TorchDispatcher(pad_to=pad_to)
    if name in ("triton", "auto"):
        return (
            TritonDispatcher(pad_to=pad_to) if name == "triton" else AutoDispatcher(pad_to=pad_to)
        )
    raise ValueError(f"dispatcher name must be 'auto', 'torch' or 'triton', got {name!r}")
