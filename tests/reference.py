"""Plain, obviously-correct reference implementations used by the tests.

Legend: T tokens, D dim, F hidden, E experts, K experts per token.

Nothing here sorts, groups or scatters: every token is sent through each of its chosen
experts one choice at a time, with that expert's weights gathered per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import moeblocks as mb


def expert_forward(bank: mb.SwiGLUExperts | mb.GELUExperts, x_TD: Tensor, e_T: Tensor) -> Tensor:
    """Run token t through expert e_T[t], with per-token gathered weights."""
    if isinstance(bank, mb.SwiGLUExperts):
        h_TF2 = torch.bmm(x_TD.unsqueeze(1), bank.w_in_EDF2[e_T]).squeeze(1)
        gate_TF, up_TF = h_TF2.chunk(2, dim=-1)
        h_TF = F.silu(gate_TF) * up_TF
    else:
        h_TF = F.gelu(torch.bmm(x_TD.unsqueeze(1), bank.w_in_EDF[e_T]).squeeze(1))
    return torch.bmm(h_TF.unsqueeze(1), bank.w_out_EFD[e_T]).squeeze(1)


def layer_forward(layer: mb.MoELayer, x: Tensor, experts_TK: Tensor) -> Tensor:
    """The MoE layer with the routing choice ``experts_TK`` taken as given.

    Scores, probabilities and weights are recomputed here, so gradients reach the router.
    """
    tokens_TD = x.reshape(-1, x.shape[-1])
    probs_TE = torch.softmax(layer.router.scorer(tokens_TD), dim=-1)
    w_TK = probs_TE.gather(1, experts_TK)
    if experts_TK.shape[1] > 1:
        w_TK = w_TK / w_TK.sum(dim=1, keepdim=True)
    out_TD = torch.zeros_like(tokens_TD)
    for j in range(experts_TK.shape[1]):
        y_TD = expert_forward(layer.experts, tokens_TD, experts_TK[:, j])
        out_TD = out_TD + w_TK[:, j : j + 1].to(y_TD.dtype) * y_TD
    return out_TD.reshape(x.shape)
