"""Dispatchers backed by the Triton kernels of :mod:`moeblocks.kernels`.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows (N plus
padding), D model dim.

Triton is imported when a dispatcher first moves tensors, never when this module is
imported, so ``import moeblocks`` works on machines without Triton.
"""

from __future__ import annotations

import importlib.util

from jaxtyping import Float
from torch import Tensor

from moeblocks._checks import check_int
from moeblocks.dispatch import TorchDispatcher
from moeblocks.routing import Layout, Routing

__all__ = ["AutoDispatcher", "TritonDispatcher"]


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


class TritonDispatcher:
    """The :class:`~moeblocks.dispatch.Dispatcher` protocol on Triton kernels.

    Returns the same grouped tensor and the same :class:`~moeblocks.routing.Layout` as
    :class:`~moeblocks.dispatch.TorchDispatcher` (bitwise for the layout and for
    float32) when ``pad_to == 1``, with a histogram-and-prefix-sum index build instead
    of an argsort, a token-major permute that reads every token row once, and a combine
    that sums the K copies of a token in a fixed order and gets both of its gradients in
    one pass.

    No host sync: every output size is known from T, K, E and ``pad_to``. With
    ``pad_to > 1`` that means the worst-case row count
    :func:`moeblocks.kernels.num_rows_bound` (``N + min(E, N)·(pad_to − 1)``, aligned):
    the rows the segments do not need are extra zero padding at the end of the last
    expert's segment (its ``group_sizes`` entry includes them, so the sizes still sum
    to R), which the expert bank computes and unpermute never reads. Up to that tail,
    the layout equals the torch dispatcher's.

    It runs on CUDA tensors, and on CPU tensors only through Triton's interpreter
    (``TRITON_INTERPRET=1`` set before the kernels are first imported). Anywhere else
    it raises instead of falling back to another backend.

    Args:
        pad_to: Round every expert segment up to a multiple of this many rows (filled
            with zeros), for grouped GEMMs that want aligned segments. 1 means no padding.
        sync_checks: Also range-check the expert ids of CUDA tensors in :meth:`permute`
            (one device sync per call). CPU tensors are always checked; unchecked bad ids
            are never read or written out of bounds (see
            :func:`moeblocks.kernels.build_index`).

    Raises:
        RuntimeError: If Triton is not installed.
    """

    def __init__(self, pad_to: int = 1, *, sync_checks: bool = False) -> None:
        check_int(pad_to, "pad_to")
        if not _triton_installed():
            raise RuntimeError(
                "TritonDispatcher needs the 'triton' package, which is not installed; "
                "pip install 'moeblocks[triton]' (Linux x86-64 with CUDA) or use "
                "TorchDispatcher / make_dispatcher('torch')."
            )
        self.pad_to = pad_to
        self.sync_checks = bool(sync_checks)

    def __repr__(self) -> str:
        extra = ", sync_checks=True" if self.sync_checks else ""
        return f"TritonDispatcher(pad_to={self.pad_to}{extra})"

    def permute(
        self, tokens: Float[Tensor, "T D"], routing: Routing
    ) -> tuple[Float[Tensor, "R D"], Layout]:
        """Gather the K copies of every token into expert-grouped rows.

        Args:
            tokens: Token vectors.
            routing: The router's decision for these tokens.

        Returns:
            The grouped copies (padding rows are zero) and their :class:`Layout`.

        Raises:
            ValueError: If shapes, devices or expert ids do not fit together.
            TypeError: If ``tokens`` is not floating or the expert ids are not integers.
            RuntimeError: If Triton cannot run on the tensors' device.
        """
        from moeblocks import kernels

        experts_TK = routing.experts
        if experts_TK.dim() != 2 or tokens.dim() != 2 or experts_TK.shape[0] != tokens.shape[0]:
            raise ValueError(
                "tokens must be (T, D) and routing.experts (T, K) with the same T, got "
                f"tokens {tuple(tokens.shape)} and routing.experts {tuple(experts_TK.shape)}"
            )
        if experts_TK.device != tokens.device:
            raise ValueError(
                f"routing.experts is on {experts_TK.device} but tokens is on "
                f"{tokens.device}; expected both on the same device"
            )
        index = kernels.build_index(
            experts_TK, routing.num_experts, self.pad_to, sync_checks=self.sync_checks
        )
        K = routing.top_k
        grouped_RD = kernels.permute(tokens, index.row_of_slot, index.slot_of_row, K)
        layout = Layout(
            row_of_slot=index.row_of_slot,
            slot_of_row=index.slot_of_row,
            counts=index.counts,
            group_sizes=index.group_sizes,
            offsets=index.offsets,
        )
        return grouped_RD, layout

    def unpermute(
        self, grouped: Float[Tensor, "R D"], layout: Layout, weights: Float[Tensor, "T K"]
    ) -> Float[Tensor, "T D"]:
        """Combine expert outputs: ``out[t] = Σ_j weights[t, j] · grouped[row(t·K + j)]``.

        The K products are summed in float32, in the order j = 0 … K-1, then rounded
        once to ``grouped.dtype``. ``weights`` keeps its own dtype (it is not rounded
        to ``grouped.dtype`` first, unlike the torch reference) and gets a gradient of
        it. The backward pass computes the gradients of ``grouped`` and ``weights`` in
        one pass over the rows.

        Args:
            grouped: Expert outputs in grouped order.
            layout: The layout returned by :meth:`permute`.
            weights: Combine weights per token and choice.

        Returns:
            One vector per token, in ``grouped.dtype``.
        """
        from moeblocks import kernels

        if weights.dim() != 2:
            raise ValueError(f"weights must be (T, K), got shape {tuple(weights.shape)}")
        # K comes from weights, so a wrong K would otherwise surface as a row_of_slot error.
        if weights.numel() != layout.row_of_slot.shape[0]:
            raise ValueError(
                f"weights must have shape [T, K] with T·K = {layout.row_of_slot.shape[0]} "
                f"slots (layout.row_of_slot), got {tuple(weights.shape)}"
            )
        return kernels.unpermute(
            grouped, layout.row_of_slot, layout.slot_of_row, weights.shape[1], weights
        )


class AutoDispatcher:
    """Triton kernels for CUDA tensors, the torch reference for everything else.

    The backend is picked per call from the device of the tensors, so one model moves
    between CPU and GPU without rebuilding its layers. Both backends produce the same
    :class:`~moeblocks.routing.Layout`, so either can unpermute what the other
    permuted. CUDA tensors without Triton installed raise ``RuntimeError`` rather than
    falling back silently: install ``moeblocks[triton]`` or choose ``"torch"``.

    Args:
        pad_to: Segment alignment, see :class:`TritonDispatcher`.
    """

    def __init__(self, pad_to: int = 1) -> None:
        check_int(pad_to, "pad_to")
        self.pad_to = pad_to
        self._torch = TorchDispatcher(pad_to=pad_to)
        self._triton = TritonDispatcher(pad_to=pad_to) if _triton_installed() else None

    def __repr__(self) -> str:
        return f"AutoDispatcher(pad_to={self.pad_to})"

    def _backend(self, tensor: Tensor) -> TorchDispatcher | TritonDispatcher:
        if tensor.device.type != "cuda":
            return self._torch
        if self._triton is None:
            raise RuntimeError(
                "AutoDispatcher got CUDA tensors but Triton is not installed; install "
                "'moeblocks[triton]' or use make_dispatcher('torch')"
            )
        return self._triton

    def permute(
        self, tokens: Float[Tensor, "T D"], routing: Routing
    ) -> tuple[Float[Tensor, "R D"], Layout]:
        """Gather the K copies of every token into expert-grouped rows.

        Args:
            tokens: Token vectors.
            routing: The router's decision for these tokens.

        Returns:
            The grouped copies (padding rows are zero) and their :class:`Layout`.
        """
        return self._backend(tokens).permute(tokens, routing)

    def unpermute(
        self, grouped: Float[Tensor, "R D"], layout: Layout, weights: Float[Tensor, "T K"]
    ) -> Float[Tensor, "T D"]:
        """Weight the expert outputs and sum the K copies of each token back.

        Args:
            grouped: Expert outputs in grouped order.
            layout: The layout returned by :meth:`permute`.
            weights: Combine weights per token and choice.

        Returns:
            One vector per token.
        """
        return self._backend(grouped).unpermute(grouped, layout, weights)
