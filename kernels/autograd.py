"""Backward passes of permute, unpermute and slot_dot, written with the ops themselves.

Legend: T tokens, K experts per token, N = T·K slots, R grouped rows, D model dim.

With ``P_w`` the weighted permute (``[T, D] -> [R, D]``) and ``U_w`` the weighted
unpermute (``[R, D] -> [T, D]``), ``U_w`` is the transpose of ``P_w``. So:

* permute ``y = P_w x``:  ``dx = U_w g``,  ``dw[t, j] = <x[t], g[row(t, j)]>``
* unpermute ``o = U_w y``:  ``dy = P_w g``,  ``dw[t, j] = <g[t], y[row(t, j)]>``
* slot_dot ``s[t, j] = <a[t], b[row(t, j)]>``:  ``da = U_g b``,  ``db = P_g a``

Each backward is built from these three differentiable ops, so double backward works
too. The ops live in their own modules; this one ties them together, which would
otherwise make the modules import each other.
"""

import torch
from torch import Tensor

from . import permute as _permute_module  # noqa: F401  (registers moeblocks::permute)
from . import slot_dot as _slot_dot_module  # noqa: F401  (registers moeblocks::slot_dot)
from . import unpermute as _unpermute_module  # noqa: F401  (registers moeblocks::unpermute)

_ops = torch.ops.moeblocks


def _save_inputs(ctx, inputs: tuple, output: Tensor) -> None:
    first, second, row_of_slot, slot_of_row, top_k = inputs
    ctx.save_for_backward(first, second, row_of_slot, slot_of_row)
    ctx.top_k = top_k


def _save_weighted_inputs(ctx, inputs: tuple, output: Tensor) -> None:
    # The rows are only needed for the weight gradient; without weights, keep only
    # their dtype so a large activation is not held alive for nothing.
    rows, weights, row_of_slot, slot_of_row, top_k = inputs
    ctx.save_for_backward(rows if weights is not None else None, weights, row_of_slot, slot_of_row)
    ctx.rows_dtype = rows.dtype
    ctx.top_k = top_k


def _permute_backward(ctx, grad_RD: Tensor):
    x_TD, w_TK, row_of_slot_N, slot_of_row_R = ctx.saved_tensors
    index = (row_of_slot_N, slot_of_row_R, ctx.top_k)
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.unpermute(grad_RD, w_TK, *index).to(ctx.rows_dtype)
    if w_TK is not None and ctx.needs_input_grad[1]:
        grad_w = _ops.slot_dot(x_TD, grad_RD, *index).to(w_TK.dtype)
    return grad_x, grad_w, None, None, None


def _unpermute_backward(ctx, grad_TD: Tensor):
    y_RD, w_TK, row_of_slot_N, slot_of_row_R = ctx.saved_tensors
    index = (row_of_slot_N, slot_of_row_R, ctx.top_k)
    grad_y = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_y = _ops.permute(grad_TD, w_TK, *index).to(ctx.rows_dtype)
    if w_TK is not None and ctx.needs_input_grad[1]:
        grad_w = _ops.slot_dot(grad_TD, y_RD, *index).to(w_TK.dtype)
    return grad_y, grad_w, None, None, None


def _slot_dot_backward(ctx, grad_TK: Tensor):
    a_TD, b_RD, row_of_slot_N, slot_of_row_R = ctx.saved_tensors
    index = (row_of_slot_N, slot_of_row_R, ctx.top_k)
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _ops.unpermute(b_RD, grad_TK, *index).to(a_TD.dtype)
    if ctx.needs_input_grad[1]:
        grad_b = _ops.permute(a_TD, grad_TK, *index).to(b_RD.dtype)
    return grad_a, grad_b, None, None, None


torch.library.register_autograd(
    "moeblocks::permute", _permute_backward, setup_context=_save_weighted_inputs
)
torch.library.register_autograd(
    "moeblocks::unpermute", _unpermute_backward, setup_context=_save_weighted_inputs
)
torch.library.register_autograd(
    "moeblocks::slot_dot", _slot_dot_backward, setup_context=_save_inputs
)
