"""Plain, obviously-correct reference implementations used by the tests.

Legend: T tokens, D dim, F hidden, E experts, K experts per token.

Nothing here sorts, groups or scatters: every token is sent through each of its chosen
experts one choice at a time, with that expert's weights gathered per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


# ------------------------------------------------------------------ composed blocks
# References for the stock Router's parts, the expert banks' activations and biases,
# shared experts, input weighting and capacity. Every one works on one token at a time
# (the only sorting is a Python sort of one token's keys to pick its experts) and writes
# each formula out instead of calling moeblocks, so a wrong formula in the library cannot
# cancel against the same formula here.


def plain_activation(name: str, h: Tensor) -> Tensor:
    """The named activation, written out."""
    if name == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    if name == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    if name == "silu":
        return h * torch.sigmoid(h)
    raise ValueError(name)


def gated_activation(activation: object, gate: Tensor, up: Tensor) -> Tensor:
    """A GLU or GPT-OSS clamped-SwiGLU hidden vector, written out."""
    if isinstance(activation, mb.ClampedSwiGLU):
        limit = activation.limit
        g = torch.where(gate > limit, torch.full_like(gate, limit), gate)
        u = torch.where(up > limit, torch.full_like(up, limit), up)
        u = torch.where(u < -limit, torch.full_like(u, -limit), u)
        return (u + 1) * g * torch.sigmoid(activation.alpha * g)
    assert isinstance(activation, mb.GLU)
    return plain_activation(activation.activation, gate) * up


def expert_token(bank: nn.Module, e: int, x_D: Tensor) -> Tensor:
    """Expert ``e`` of a SwiGLU or MLP bank (any activation, biases) on one token."""
    if isinstance(bank, mb.SwiGLUExperts):
        hidden = bank.hidden
        h = x_D @ bank.w_in_EDF2[e]
        if bank.b_in_EF2 is not None:
            h = h + bank.b_in_EF2[e]
        h = gated_activation(bank.activation, h[:hidden], h[hidden:])
    else:
        assert isinstance(bank, mb.MLPExperts)
        h = x_D @ bank.w_in_EDF[e]
        if bank.b_in_EF is not None:
            h = h + bank.b_in_EF[e]
        h = plain_activation(bank.activation, h)
    y = h @ bank.w_out_EFD[e]
    if bank.b_out_ED is not None:
        y = y + bank.b_out_ED[e]
    return y


def shared_token(shared: mb.SharedExperts, x_D: Tensor) -> Tensor:
    """``σ(x · w_gate) · Σ_s expert_s(x)`` (no gate: the plain sum) for one token."""
    y = sum(expert_token(shared.experts, s, x_D) for s in range(shared.experts.num_experts))
    if shared.gate_D is not None:
        y = torch.sigmoid(x_D @ shared.gate_D) * y
    return y


def top_indices(values: list[float], k: int, allowed: list[int] | None = None) -> list[int]:
    """Indices of the k largest values (among ``allowed``), largest first."""
    pool = range(len(values)) if allowed is None else allowed
    return sorted(pool, key=lambda i: -values[i])[:k]


def select_token(selection: object, key_E: list[float], k: int) -> list[int]:
    """Plain or group-limited (DeepSeek-V3) top-k of one token's selection key."""
    if isinstance(selection, mb.GroupLimitedTopK):
        E, G = len(key_E), selection.num_groups
        size = E // G
        members = [list(range(g * size, (g + 1) * size)) for g in range(G)]
        group_score = [
            sum(key_E[i] for i in top_indices(key_E, selection.group_score_k, members[g]))
            for g in range(G)
        ]
        kept = top_indices(group_score, selection.groups_per_token)
        return top_indices(key_E, k, [i for g in sorted(kept) for i in members[g]])
    assert isinstance(selection, mb.TopK)
    return top_indices(key_E, k)


def route_token(router: mb.Router, x_D: Tensor, k: int) -> tuple[list[int], Tensor, Tensor]:
    """``(experts, weights, probs)`` of one token under the stock router (no noise/jitter)."""
    scorer = router.scorer
    assert isinstance(scorer, mb.LinearScorer)
    logits_E = scorer.weight_ED @ x_D
    if scorer.bias_E is not None:
        logits_E = logits_E + scorer.bias_E
    if router.scoring == "sigmoid":
        probs_E = 1 / (1 + torch.exp(-logits_E))
    else:
        probs_E = torch.exp(logits_E - logits_E.max())
        probs_E = probs_E / probs_E.sum()
    key_E = logits_E if router.scoring == "softmax_topk" else probs_E
    if router.balancer is not None:
        key_E = key_E + router.balancer.bias.to(key_E.dtype)  # selection only
    chosen = select_token(router.selection, key_E.tolist(), k)
    if router.scoring == "softmax_topk":
        z_K = torch.exp(logits_E[chosen] - logits_E[chosen].max())
        gates_K = z_K / z_K.sum()
    else:
        gates_K = probs_E[chosen]
    policy = router.weights
    if policy.renormalize == "always" or (policy.renormalize == "k>1" and k > 1):
        gates_K = gates_K / (gates_K.sum() + policy.eps)
    return chosen, policy.scale * gates_K, probs_E


def capacity_dropped(
    experts_TK: list[list[int]], num_experts: int, group_size: int, capacity: int
) -> list[list[bool]]:
    """Brute-force capacity: per group, all first choices queue before second choices,
    tokens in order within a choice rank; a copy past ``capacity`` is dropped."""
    T = len(experts_TK)
    K = len(experts_TK[0]) if T else 0
    dropped = [[False] * K for _ in range(T)]
    for start in range(0, T, max(group_size, 1)):
        used = [0] * num_experts
        for j in range(K):
            for t in range(start, min(start + group_size, T)):
                e = experts_TK[t][j]
                if used[e] < capacity:
                    used[e] += 1
                else:
                    dropped[t][j] = True
    return dropped


def blocks_layer_forward(
    layer: mb.MoELayer, x: Tensor, k: int
) -> tuple[Tensor, list[list[int]], list[list[bool]]]:
    """A stock-router MoELayer (any bank, shared experts, capacity, input weighting),
    one token and one choice at a time.

    Returns the output, the chosen experts and the dropped copies. Dropped copies are
    never computed here, so they contribute nothing to outputs or gradients.
    """
    D = x.shape[-1]
    tokens_TD = x.reshape(-1, D)
    T = tokens_TD.shape[0]
    routes = [route_token(layer.router, tokens_TD[t], k) for t in range(T)]
    experts_TK = [chosen for chosen, _, _ in routes]
    dropped = [[False] * k for _ in range(T)]
    if layer.capacity is not None:
        cap = layer.capacity
        S = x.shape[-2] if cap.per == "sequence" and x.ndim >= 3 else T
        E = layer.num_experts
        C = cap.limit if cap.limit is not None else math.ceil(cap.factor * S * k / E)
        dropped = capacity_dropped(experts_TK, E, S, C)
    rows = []
    for t in range(T):
        x_D = tokens_TD[t]
        y_D = torch.zeros_like(x_D)
        chosen, w_K, _ = routes[t]
        for j, e in enumerate(chosen):
            if dropped[t][j]:
                continue
            if layer.weight_inputs:
                y_D = y_D + expert_token(layer.experts, e, w_K[j] * x_D)
            else:
                y_D = y_D + w_K[j] * expert_token(layer.experts, e, x_D)
        if layer.shared is not None:
            y_D = y_D + shared_token(layer.shared, x_D)
        rows.append(y_D)
    out_TD = torch.stack(rows) if rows else torch.zeros_like(tokens_TD)
    return out_TD.reshape(x.shape), experts_TK, dropped
