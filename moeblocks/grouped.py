"""Grouped matrix multiply: one weight matrix per contiguous segment of rows.

Legend: R rows (grouped by expert), E experts, I input dim, O output dim.

``grouped_mm(x_RI, w_EIO, group_sizes_E)`` computes ``x[rows of e] @ w[e]`` for every
expert ``e``. It is the compute seam of the expert banks; backends are chosen by name:

- ``"torch"``: ``torch._grouped_mm``, one fused call with no host sync. Used where the
  installed torch supports it for the device and dtype (see :func:`torch_grouped_mm_supported`).
- ``"loop"``: one matmul per expert over ``torch.split`` views. It reads the group sizes
  on the host (one device sync) and works on every device and dtype.
- ``"auto"``: ``"torch"`` where supported, else ``"loop"``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["grouped_mm", "torch_grouped_mm_supported"]


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


def _loop(x_RI: Tensor, w_EIO: Tensor, group_sizes_E: Tensor) -> Tensor:
    sizes = group_sizes_E.tolist()  # host sync: split needs Python ints
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


def grouped_mm(
    x_RI: Float[Tensor, "R I"],
    w_EIO: Float[Tensor, "E I O"],
    group_sizes_E: Int[Tensor, " E"],
    backend: str = "auto",
) -> Float[Tensor, "R O"]:
    """Multiply each expert's contiguous rows by that expert's weight matrix.

    Args:
        x_RI: Rows grouped by expert, ``group_sizes_E[e]`` rows for expert ``e`` in order.
        w_EIO: One ``[I, O]`` matrix per expert.
        group_sizes_E: Rows per expert; must sum to R.
        backend: ``"auto"``, ``"torch"`` or ``"loop"`` (see the module docstring).
            Asking for ``"torch"`` where it is unsupported raises ``ValueError``.

    Returns:
        ``out[r] = x[r] @ w[expert of r]``.

    Example:
        >>> x = torch.ones(3, 2)
        >>> w = torch.stack([torch.eye(2), 2 * torch.eye(2)])
        >>> grouped_mm(x, w, torch.tensor([1, 2]), backend="loop").tolist()
        [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
    """
    if backend == "auto":
        backend = "torch" if torch_grouped_mm_supported(x_RI, w_EIO) else "loop"
    if backend == "torch":
        if not torch_grouped_mm_supported(x_RI, w_EIO):
            raise ValueError(
                "backend='torch' needs torch._grouped_mm support for "
                f"{x_RI.dtype} on {x_RI.device} (have torch {torch.__version__}); "
                "use backend='loop' or 'auto'"
            )
        return _torch(x_RI, w_EIO, group_sizes_E)
    if backend == "loop":
        return _loop(x_RI, w_EIO, group_sizes_E)
    raise ValueError(f"backend must be 'auto', 'torch' or 'loop', got {backend!r}")
