"""Backward passes of permute, unpermute and slot_dot, written with the ops themselves.

Legend: T tokens, K experts per token, N = T·K slots, R grouped rows, D model dim.

With ``P_w`` the weighted permute (``[T, D] -> [R, D]``) and ``U_w`` the weighted
unpermute (``[R, D] -> [T, D]``), ``U_w`` is the transpose of ``P_w``. So:

* permute ``y = P_w x``:  ``dx = U_w g``,  ``dw[t, j] = <x[t], g[row(t, j)]>``
* unpermute ``o = U_w y``:  ``dy = P_w g``,  ``dw[t, j] = <g[t], y[row(t, j)]>``
* slot_dot ``s[t, j] = <a[t], b[row(t, j)]>``:  ``da = U_g b``,  ``db = P_g a``

When unpermute needs both gradients, the fused ``unpermute_backward`` op computes
``(P_w g, slot_dot(g, y))`` in one pass; its own backward, for output gradients
``(h, s)``, is ``dg = U_w h + U_s y``, ``dy = P_s g``, ``dw = slot_dot(g, h)``.

Each backward is built from these differentiable ops, so double backward works too.
The ops live in their own modules; this one ties them together, which would otherwise
make the modules import each other.
"""

import torch
from torch import Tensor

from . import permute as _permute_module  # noqa: F401  (registers moeblocks::permute)
from . import slot_dot as _slot_dot_module  # noqa: F401  (registers moeblocks::slot_dot)
from . import unpermute as _unpermute_module  # noqa: F401  (registers moeblocks::unpermute)
from . import unpermute_backward as _fused_module  # noqa: F401  (registers the fused backward)

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
    if w_TK is not None and ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
        # One pass reads grad once and each row of y once (see unpermute_backward).
        grad_y, grad_w = _ops.unpermute_backward(grad_TD, y_RD, w_TK, *index)
        return grad_y, grad_w.to(w_TK.dtype), None, None, None
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


def _save_fused_inputs(ctx, inputs: tuple, output: tuple) -> None:
    grad, y, weights, row_of_slot, slot_of_row, top_k = inputs
    ctx.save_for_backward(grad, y, weights, row_of_slot, slot_of_row)
    ctx.top_k = top_k


def _fused_backward(ctx, grad_grad_y: Tensor | None, grad_grad_w: Tensor | None):
    g_TD, y_RD, w_TK, row_of_slot_N, slot_of_row_R = ctx.saved_tensors
    index = (row_of_slot_N, slot_of_row_R, ctx.top_k)
    # An output nobody used arrives as None (or zeros): it adds nothing.
    h_RD = grad_grad_y
    s_TK = grad_grad_w
    d_g = d_y = d_w = None
    if ctx.needs_input_grad[0]:
        d_g = torch.zeros_like(g_TD)
        if h_RD is not None:
            d_g = d_g + _ops.unpermute(h_RD, w_TK, *index).to(g_TD.dtype)
        if s_TK is not None:
            d_g = d_g + _ops.unpermute(y_RD, s_TK, *index).to(g_TD.dtype)
    if ctx.needs_input_grad[1]:
        d_y = torch.zeros_like(y_RD)
        if s_TK is not None:
            d_y = _ops.permute(g_TD, s_TK, *index).to(y_RD.dtype)
    if ctx.needs_input_grad[2]:
        d_w = torch.zeros_like(w_TK)
        if h_RD is not None:
            d_w = _ops.slot_dot(g_TD, h_RD, *index).to(w_TK.dtype)
    return d_g, d_y, d_w, None, None, None


torch.library.register_autograd(
    "moeblocks::unpermute_backward", _fused_backward, setup_context=_save_fused_inputs
)
torch.library.register_autograd(
    "moeblocks::permute", _permute_backward, setup_context=_save_weighted_inputs
)
torch.library.register_autograd(
    "moeblocks::unpermute", _unpermute_backward, setup_context=_save_weighted_inputs
)
torch.library.register_autograd(
    "moeblocks::slot_dot", _slot_dot_backward, setup_context=_save_inputs
)
