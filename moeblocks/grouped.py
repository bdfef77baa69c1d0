"""Grouped matrix multiply: one weight matrix per contiguous segment of rows.

Legend: R rows (grouped by expert), E experts, I input dim, O output dim.

``grouped_mm(x_RI, w_EIO, group_sizes_E)`` computes ``x[rows of e] @ w[e]`` for every
expert ``e``. It is the compute seam of the expert banks; backends are chosen by name:

- ``"torch"``: ``torch._grouped_mm``, one fused call with no host sync. Used where the
  installed torch supports it for the device and dtype (see :func:`torch_grouped_mm_supported`).
- ``"loop"``: one matmul per expert over ``torch.split`` views. It needs the group sizes
  on the host and works on every device and dtype. Read from a GPU tensor they cost one
  device sync per call; a caller that multiplies the same segments several times (an
  expert bank's in and out projections, their backward) reads them once per step
  (``group_sizes_E.tolist()``) and passes them as ``host_sizes``: one sync per step.
- ``"auto"``: ``"torch"`` where supported, else ``"loop"``.

Inputs are checked before any backend runs: shapes, dtypes and devices always; that the
group sizes are >= 0 and sum to R (which reads them on the host) on CPU tensors, in the
``"loop"`` backend (which reads them anyway), and elsewhere with ``sync_checks=True``.
A wrong sum would otherwise make ``torch._grouped_mm`` return uninitialised rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from moeblocks._checks import check_float, check_index, check_same_device, value_checks

__all__ = ["grouped_mm", "resolve_backend", "torch_grouped_mm_supported"]


def torch_grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    """Whether ``torch._grouped_mm`` serves these operands well on this install.

    Both operands need row strides of a multiple of 16 bytes. CUDA needs bf16 on compute
    capability 9.0+. On CPU only eager float32 is taken: there the bf16/fp16 kernels
    measured ~70x slower than float32 (torch 2.13, 2 cores), slower than the loop.
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    aligned = all((t.stride(-2) * t.element_size()) % 16 == 0 for t in (x, w)) and all(
        (t.shape[-1] * t.element_size()) % 16 == 0 for t in (x, w)
    )
    if not aligned:
        return False
    if x.device.type == "cpu":
        # torch._grouped_mm's fake kernel accepts bf16 only, so under torch.compile the
        # CPU float32 call cannot be traced.
        return x.dtype == torch.float32 and not torch.compiler.is_compiling()
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def _check_sizes(sizes: list[int], rows: int) -> None:
    if any(s < 0 for s in sizes) or sum(sizes) != rows:
        shown = sizes if len(sizes) <= 16 else f"{sizes[:16]}... ({len(sizes)} sizes)"
        raise ValueError(
            f"group_sizes_E must be >= 0 and sum to R = {rows} (the rows of x_RI), "
            f"got {shown} summing to {sum(sizes)}"
        )


def _check_operands(x_RI: Tensor, w_EIO: Tensor, group_sizes_E: Tensor) -> None:
    check_float(x_RI, "x_RI", 2)
    check_float(w_EIO, "w_EIO", 3)
    check_index(group_sizes_E, "group_sizes_E", 1)
    if x_RI.shape[1] != w_EIO.shape[1]:
        raise ValueError(
            f"x_RI must have shape [R, {w_EIO.shape[1]}] (I of w_EIO {tuple(w_EIO.shape)}), "
            f"got {tuple(x_RI.shape)}"
        )
    if group_sizes_E.shape[0] != w_EIO.shape[0]:
        raise ValueError(
            f"group_sizes_E must have shape [{w_EIO.shape[0]}] (one size per expert of "
            f"w_EIO), got {tuple(group_sizes_E.shape)}"
        )
    if group_sizes_E.shape[0] == 0 and x_RI.shape[0] != 0:
        _check_sizes([], x_RI.shape[0])  # no expert to take the rows
    if x_RI.dtype != w_EIO.dtype:
        raise TypeError(f"x_RI has dtype {x_RI.dtype} but w_EIO has {w_EIO.dtype}")
    check_same_device(w_EIO, "w_EIO", x_RI, "x_RI")
    check_same_device(group_sizes_E, "group_sizes_E", x_RI, "x_RI")


def _check_host_sizes(
    host_sizes: Sequence[int], group_sizes_E: Tensor, rows: int, sync_checks: bool
) -> list[int]:
    sizes = [int(s) for s in host_sizes]
    if len(sizes) != group_sizes_E.shape[0]:
        raise ValueError(
            f"host_sizes must hold one size per expert ({group_sizes_E.shape[0]}), got {len(sizes)}"
        )
    _check_sizes(sizes, rows)
    if value_checks(group_sizes_E, sync_checks):  # CPU: free; GPU: one sync, opt-in
        device_sizes = group_sizes_E.long().cpu()
        if not torch.equal(device_sizes, torch.tensor(sizes, dtype=torch.long)):
            raise ValueError(
                "host_sizes must equal group_sizes_E (the same sizes, read on the host), "
                f"got {sizes[:16]} against {device_sizes[:16].tolist()}"
            )
    return sizes


def _loop(x_RI: Tensor, w_EIO: Tensor, group_sizes_E: Tensor, sizes: list[int] | None) -> Tensor:
    if sizes is None:
        sizes = group_sizes_E.tolist()  # host sync: split needs Python ints
        if not torch.compiler.is_compiling():
            _check_sizes(sizes, x_RI.shape[0])
    # unbind/split (not w[e] / x[a:b]) so the backward stacks the per-expert gradients
    # instead of adding E full-size zero tensors.
    outs = [
        x_rI @ w_IO for x_rI, w_IO in zip(torch.split(x_RI, sizes), w_EIO.unbind(0), strict=True)
    ]
    return torch.cat(outs) if outs else x_RI.new_empty(0, w_EIO.shape[-1])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects stride-0 gradients (e.g. from ``out.sum()``).
    """

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _torch(x_RI: Tensor, w_EIO: Tensor, group_sizes_E: Tensor) -> Tensor:
    if x_RI.shape[0] == 0:
        # The fused backward rejects the degenerate strides of empty gradients.
        return x_RI @ w_EIO.sum(0) * 0 if w_EIO.shape[0] else x_RI.new_empty(0, w_EIO.shape[-1])
    offs_E = group_sizes_E.cumsum(0).to(torch.int32)
    return _ContiguousGrad.apply(torch._grouped_mm(x_RI, w_EIO, offs=offs_E))


def resolve_backend(x: Tensor, w: Tensor, backend: str) -> str:
    """The backend that :func:`grouped_mm` runs for these operands: ``"torch"`` or ``"loop"``.

    ``"auto"`` takes ``"torch"`` where :func:`torch_grouped_mm_supported` holds, else the
    loop. Callers that read the group sizes to the host once for several calls (the
    expert banks) ask here whether the loop will run.

    Raises:
        ValueError: For an unknown name, or ``"torch"`` where it is unsupported.
    """
    if backend == "auto":
        return "torch" if torch_grouped_mm_supported(x, w) else "loop"
    if backend == "torch" and not torch_grouped_mm_supported(x, w):
        raise ValueError(
            "backend='torch' needs torch._grouped_mm support for "
            f"{x.dtype} on {x.device} (have torch {torch.__version__}); "
            "use backend='loop' or 'auto'"
        )
    if backend not in ("torch", "loop"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'loop', got {backend!r}")
    return backend


def grouped_mm(
    x_RI: Float[Tensor, "R I"],
    w_EIO: Float[Tensor, "E I O"],
    group_sizes_E: Int[Tensor, " E"],
    backend: str = "auto",
    *,
    sync_checks: bool = False,
    host_sizes: Sequence[int] | None = None,
) -> Float[Tensor, "R O"]:
    """Multiply each expert's contiguous rows by that expert's weight matrix.

    Args:
        x_RI: Rows grouped by expert, ``group_sizes_E[e]`` rows for expert ``e`` in order.
        w_EIO: One ``[I, O]`` matrix per expert.
        group_sizes_E: Rows per expert, integers >= 0 that sum to R.
        backend: ``"auto"``, ``"torch"`` or ``"loop"`` (see the module docstring).
            Asking for ``"torch"`` where it is unsupported raises ``ValueError``.
        sync_checks: Also check the group sizes of GPU tensors for the ``"torch"``
            backend, and ``host_sizes`` against them, at the cost of one device sync
            (CPU tensors and the ``"loop"`` backend's own read are always checked).
        host_sizes: ``group_sizes_E`` already read on the host, for the ``"loop"``
            backend: it then reads nothing back (no sync). Checked for length and sum
            always, against ``group_sizes_E`` on CPU or with ``sync_checks``.

    Returns:
        ``out[r] = x[r] @ w[expert of r]``.

    Example:
        >>> x = torch.ones(3, 2)
        >>> w = torch.stack([torch.eye(2), 2 * torch.eye(2)])
        >>> grouped_mm(x, w, torch.tensor([1, 2]), backend="loop").tolist()
        [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]

    Raises:
        TypeError: For non-tensors, non-floating operands, non-integer group sizes, or
            operands of different dtypes.
        ValueError: For operands whose shapes or devices do not fit together, or group
            sizes that are negative or do not sum to R.
    """
    _check_operands(x_RI, w_EIO, group_sizes_E)
    backend = resolve_backend(x_RI, w_EIO, backend)
    if backend == "torch":
        if group_sizes_E.numel() and value_checks(group_sizes_E, sync_checks):
            sizes_E = group_sizes_E.long()
            if bool((sizes_E.min() < 0) | (sizes_E.sum() != x_RI.shape[0])):  # host sync
                _check_sizes(group_sizes_E.tolist(), x_RI.shape[0])
        return _torch(x_RI, w_EIO, group_sizes_E)
    sizes = None  # the loop backend
    if host_sizes is not None:
        sizes = _check_host_sizes(host_sizes, group_sizes_E, x_RI.shape[0], sync_checks)
    return _loop(x_RI, w_EIO, group_sizes_E, sizes)
