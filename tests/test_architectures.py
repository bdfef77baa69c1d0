"""Published MoE architectures as compositions of moeblocks blocks.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

Each test composes one architecture's MoE layer from the stock blocks (a dozen lines at
most, no subclass) and compares it, in float64, with a plain PyTorch transcription of
that architecture's published routing formulas, written here one token at a time with
the weights in the architecture's own layout (``[out, in]`` matrices as in its papers'
and model cards' ``x W^T``). The transcriptions read the layer's parameters through
differentiable views, so outputs, input gradients and every parameter gradient are
compared. No Hugging Face code is used here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import moeblocks as mb

# Both sides are float64 and evaluate the same formulas; only the order of additions
# differs (grouped matmuls against per-token vector products), ~1e-16 relative per
# operation over sums of a few dozen terms. A wrong formula shows at 1e-3 or more.
RTOL, ATOL = 1e-10, 1e-12


def topk(values: Tensor, k: int) -> list[int]:
    """Indices of the k largest entries of a vector, largest first (plain Python)."""
    v = values.detach().tolist()
    return sorted(range(len(v)), key=lambda i: -v[i])[:k]


def swiglu(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """``w2 (silu(w1 x) ⊙ w3 x)`` with ``[out, in]`` matrices (Shazeer 2020)."""
    h = w1 @ x
    return w2 @ (h * torch.sigmoid(h) * (w3 @ x))


def native_swiglu(bank: mb.SwiGLUExperts) -> tuple[Tensor, Tensor, Tensor]:
    """A SwiGLU bank's weights as ``w1 [E, F, D]`` (gate), ``w3 [E, F, D]`` (up),
    ``w2 [E, D, F]`` (down): views, so gradients reach the bank."""
    F = bank.hidden
    w_in = bank.w_in_EDF2.transpose(1, 2)  # [E, 2F, D], gate rows first
    return w_in[:, :F], w_in[:, F:], bank.w_out_EFD.transpose(1, 2)


def swiglu_expert(bank: mb.SwiGLUExperts):
    """``expert(i, x)``: expert i of a SwiGLU bank on one token, in the native layout."""
    w1, w3, w2 = native_swiglu(bank)
    return lambda i, x: swiglu(x, w1[i], w3[i], w2[i])


def compare(layer: mb.MoELayer, reference, x: Tensor, **forward_kwargs) -> mb.MoEOutput:
    """Outputs and the gradients of x and of every layer parameter."""
    params = list(layer.parameters())
    x = x.detach().requires_grad_()
    res = layer(x, **forward_kwargs)
    expected = reference(x)
    torch.testing.assert_close(res.out, expected, rtol=RTOL, atol=ATOL)
    grad_out = torch.randn_like(expected)
    got = torch.autograd.grad(res.out, [x, *params], grad_out, allow_unused=True)
    want = torch.autograd.grad(expected, [x, *params], grad_out, allow_unused=True)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, g, w, p in zip(names, got, want, [x, *params], strict=True):
        g = torch.zeros_like(p) if g is None else g
        w = torch.zeros_like(p) if w is None else w
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, msg=f"grad {name}")
    return res


def tokens(T: int, D: int, seed: int, scale: float = 1.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(T, D, generator=gen, dtype=torch.float64)


# --------------------------------------------------------------------------- Mixtral


def mixtral(D: int, E: int, F: int, k: int) -> mb.MoELayer:
    """Mixtral 8x7B: softmax over all logits, top-2, renormalised, SwiGLU experts."""
    weights = mb.WeightPolicy(renormalize="always")
    router = mb.Router(mb.LinearScorer(D, E), k, weights=weights)
    return mb.MoELayer(router, mb.TorchDispatcher(), mb.SwiGLUExperts(E, D, F)).double()


def mixtral_reference(layer: mb.MoELayer, k: int):
    # Mixtral of Experts (Jiang et al. 2024), eqs. 1-2:
    #   y = Σ_i Softmax(TopK(x · w_gate))_i · SwiGLU_i(x),
    # with TopK setting every logit outside the top k to -inf.
    w_gate = layer.router.scorer.weight_ED
    w1, w3, w2 = native_swiglu(layer.experts)

    def forward(x_TD: Tensor) -> Tensor:
        rows = []
        for x in x_TD:
            logits = w_gate @ x
            chosen = topk(logits, k)
            masked = torch.full_like(logits, -math.inf)
            masked[chosen] = logits[chosen]
            G = torch.softmax(masked, dim=0)
            rows.append(sum(G[i] * swiglu(x, w1[i], w3[i], w2[i]) for i in chosen))
        return torch.stack(rows)

    return forward


def test_mixtral_top2() -> None:
    torch.manual_seed(0)
    layer = mixtral(D=16, E=8, F=12, k=2)
    compare(layer, mixtral_reference(layer, 2), tokens(11, 16, 1))


def test_mixtral_top1_renormalised_weight_is_one() -> None:
    torch.manual_seed(1)
    layer = mixtral(D=16, E=8, F=12, k=1)
    res = compare(layer, mixtral_reference(layer, 1), tokens(11, 16, 2))
    # Softmax over one kept logit: the weight is exactly 1.
    assert torch.equal(res.routing.weights, torch.ones(11, 1, dtype=torch.float64))


# ------------------------------------------------------------------------- Qwen2-MoE


def qwen2_moe(D: int, E: int, F: int, k: int, f_shared: int) -> mb.MoELayer:
    """Qwen2-MoE: softmax top-k without renormalising, plus a sigmoid-gated shared expert."""
    weights = mb.WeightPolicy(renormalize="never")  # norm_topk_prob = False
    router = mb.Router(mb.LinearScorer(D, E), k, weights=weights)
    shared = mb.SharedExperts(mb.SwiGLUExperts(1, D, f_shared), gate=True)
    experts = mb.SwiGLUExperts(E, D, F)
    return mb.MoELayer(router, mb.TorchDispatcher(), experts, shared=shared).double()


def qwen2_moe_reference(layer: mb.MoELayer, k: int):
    w_gate = layer.router.scorer.weight_ED
    w1, w3, w2 = native_swiglu(layer.experts)
    s1, s3, s2 = (w[0] for w in native_swiglu(layer.shared.experts))
    w_sg = layer.shared.gate_D  # shared_expert_gate: Linear(D, 1), no bias

    # Qwen1.5-MoE / Qwen2 (Yang et al. 2024): p = softmax(w_gate x) over all experts; the
    # top-k experts are weighted by their raw p; the shared expert's output is scaled
    # by σ(w_sg · x) and added.
    def forward(x_TD: Tensor) -> Tensor:
        rows = []
        for x in x_TD:
            p = torch.softmax(w_gate @ x, dim=0)
            routed = sum(p[i] * swiglu(x, w1[i], w3[i], w2[i]) for i in topk(p, k))
            rows.append(routed + torch.sigmoid(w_sg @ x) * swiglu(x, s1, s3, s2))
        return torch.stack(rows)

    return forward


def test_qwen2_moe() -> None:
    torch.manual_seed(2)
    D, E, F, k = 16, 12, 6, 4
    layer = qwen2_moe(D, E, F, k, f_shared=4 * F)
    with torch.no_grad():
        layer.shared.gate_D.normal_()  # starts at 0, i.e. a constant gate of 1/2
    res = compare(layer, qwen2_moe_reference(layer, k), tokens(13, D, 3))
    assert bool((res.routing.weights.sum(-1) < 1).all())  # not renormalised


# ----------------------------------------------------------------------------- OLMoE


def olmoe(D: int, E: int, F: int, k: int) -> mb.MoELayer:
    """OLMoE-1B-7B: 64 experts, top-8 of a softmax over all, no renormalisation."""
    weights = mb.WeightPolicy(renormalize="never")
    router = mb.Router(mb.LinearScorer(D, E), k, weights=weights)
    losses = {"balance": mb.LoadBalanceLoss(0.01), "z": mb.ZLoss(0.001)}
    return mb.MoELayer(router, mb.TorchDispatcher(), mb.SwiGLUExperts(E, D, F), losses).double()


def olmoe_reference(layer: mb.MoELayer, k: int):
    w_router = layer.router.scorer.weight_ED
    w1, w3, w2 = native_swiglu(layer.experts)

    # OLMoE (Muennighoff et al. 2024), eq. 1: y = Σ_{i ∈ Top-k(r)} softmax(r(x))_i E_i(x)
    # with r(x) = w_router x.
    def forward(x_TD: Tensor) -> Tensor:
        rows = []
        for x in x_TD:
            p = torch.softmax(w_router @ x, dim=0)
            rows.append(sum(p[i] * swiglu(x, w1[i], w3[i], w2[i]) for i in topk(p, k)))
        return torch.stack(rows)

    return forward


def olmoe_z_loss(layer: mb.MoELayer, x_TD: Tensor) -> Tensor:
    """OLMoE eq. 3, the router z-loss: (1/T) Σ_t (log Σ_j exp r_j(x_t))²."""
    w_router = layer.router.scorer.weight_ED
    return sum(torch.logsumexp(w_router @ x_D, dim=0) ** 2 for x_D in x_TD) / len(x_TD)


def test_olmoe() -> None:
    torch.manual_seed(3)
    D, E, F, k, T = 16, 64, 4, 8, 10
    layer = olmoe(D, E, F, k)
    x = tokens(T, D, 4)
    res = compare(layer, olmoe_reference(layer, k), x)
    z = olmoe_z_loss(layer, x)
    torch.testing.assert_close(res.aux_losses["z"], 0.001 * z, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------ DeepSeek-V3


def deepseek_v3(
    D: int, E: int, F: int, k: int, groups: int, topk_groups: int, shared: int
) -> mb.MoELayer:
    """DeepSeek-V3: sigmoid affinities, selection-only bias, node-limited top-k,
    normalised gates times the routed scaling factor 2.5, shared experts."""
    router = mb.Router(
        mb.LinearScorer(D, E),
        k,
        scoring="sigmoid",
        selection=mb.GroupLimitedTopK(groups, topk_groups, group_score_k=2),
        weights=mb.WeightPolicy(renormalize="always", scale=2.5, eps=1e-20),
        balancer=mb.BiasBalancer(E, rate=1e-3),
    )
    shared_experts = mb.SharedExperts(mb.SwiGLUExperts(shared, D, F))
    experts = mb.SwiGLUExperts(E, D, F)
    return mb.MoELayer(router, mb.TorchDispatcher(), experts, shared=shared_experts).double()


def deepseek_v3_reference(layer: mb.MoELayer, k: int, G: int, M: int):
    E = layer.num_experts
    bias_E = layer.router.balancer.bias.to(torch.float64)
    e_ED = layer.router.scorer.weight_ED  # expert centroids e_i
    w1, w3, w2 = native_swiglu(layer.experts)
    s1, s3, s2 = native_swiglu(layer.shared.experts)
    n_shared = layer.shared.experts.num_experts
    size = E // G

    # DeepSeek-V3 technical report (2024), eqs. 12-16: s_i = σ(u · e_i); experts are
    # chosen by TopK(s_i + b_i) (b only selects); g_i = s_i / Σ_chosen s_j, times the
    # routed scaling factor 2.5; h = u + Σ_shared FFN_s(u) + Σ_i g_i FFN_i(u). Node-limited
    # routing: each group of E/G experts scores the sum of its K_r/M = 2 highest s_i + b_i,
    # and only the M best groups' experts can be chosen. (The residual u is outside the
    # layer.)
    def reference(u_TD: Tensor) -> Tensor:
        rows = []
        for u in u_TD:
            s = torch.sigmoid(e_ED @ u)
            key = s + bias_E
            group_score = key.view(G, size).topk(2, dim=1).values.sum(1)
            allowed = torch.full_like(key, -math.inf)
            for g in topk(group_score, M):
                allowed[g * size : (g + 1) * size] = key[g * size : (g + 1) * size]
            chosen = topk(allowed, k)
            g_K = s[chosen] / s[chosen].sum() * 2.5
            h = sum(swiglu(u, s1[j], s3[j], s2[j]) for j in range(n_shared))
            routed = sum(g_K[j] * swiglu(u, w1[i], w3[i], w2[i]) for j, i in enumerate(chosen))
            rows.append(h + routed)
        return torch.stack(rows)

    return reference


def test_deepseek_v3() -> None:
    torch.manual_seed(4)
    D, E, F, k, G, M, n_shared = 16, 32, 4, 8, 8, 4, 2
    layer = deepseek_v3(D, E, F, k, G, M, n_shared)
    bias_E = torch.randn(E, dtype=torch.float64) * 0.1
    layer.router.balancer.bias.copy_(bias_E)
    layer.eval()  # the balancer only counts loads in training; the output is the same
    e_ED = layer.router.scorer.weight_ED
    x = tokens(12, D, 5)
    res = compare(layer, deepseek_v3_reference(layer, k, G, M), x)
    # The bias and the group limit both changed some choice (else they went untested).
    s_TE = torch.sigmoid(x @ e_ED.T)
    plain = s_TE.topk(k).indices.sort(-1).values
    with_bias = (s_TE + bias_E).topk(k).indices.sort(-1).values
    assert not torch.equal(plain, with_bias)
    assert not torch.equal(with_bias, res.routing.experts.sort(-1).values)


# ---------------------------------------------------------------------------- GPT-OSS


def gpt_oss(D: int, E: int, F: int, k: int) -> mb.MoELayer:
    """gpt-oss: router with bias, softmax over the top-k logits, clamped SwiGLU with biases."""
    weights = mb.WeightPolicy(renormalize="never")
    router = mb.Router(mb.LinearScorer(D, E, bias=True), k, scoring="softmax_topk", weights=weights)
    act = mb.ClampedSwiGLU(alpha=1.702, limit=7.0)
    experts = mb.SwiGLUExperts(E, D, F, activation=act, bias=True)
    return mb.MoELayer(router, mb.TorchDispatcher(), experts).double()


ALPHA, LIMIT = 1.702, 7.0  # gpt-oss's clamped SwiGLU


def gpt_oss_expert(bank: mb.SwiGLUExperts):
    """``expert(i, x)``: gpt-oss's clamped SwiGLU expert with biases, native layout."""
    E, F, D = bank.num_experts, bank.hidden, bank.dim
    # gpt-oss keeps gate and up interleaved in mlp1 ([E, 2F, D], gate at even rows);
    # moeblocks stores them side by side. Interleave the views to get the native layout.
    gate_w, up_w = bank.w_in_EDF2.transpose(1, 2).chunk(2, dim=1)
    mlp1_w = torch.stack([gate_w, up_w], dim=2).reshape(E, 2 * F, D)
    gate_b, up_b = bank.b_in_EF2.chunk(2, dim=1)
    mlp1_b = torch.stack([gate_b, up_b], dim=2).reshape(E, 2 * F)
    mlp2_w, mlp2_b = bank.w_out_EFD.transpose(1, 2), bank.b_out_ED

    # gpt-oss model card (OpenAI 2025): each expert computes h = mlp1 x + b1,
    # gate = min(h_even, 7), up = clamp(h_odd, -7, 7),
    # y = mlp2 ((up + 1) ⊙ gate σ(1.702 gate)) + b2.
    def expert(i: int, x: Tensor) -> Tensor:
        h = mlp1_w[i] @ x + mlp1_b[i]
        gate, up = h[0::2].clamp(max=LIMIT), h[1::2].clamp(-LIMIT, LIMIT)
        return mlp2_w[i] @ ((up + 1) * gate * torch.sigmoid(ALPHA * gate)) + mlp2_b[i]

    return expert


def gpt_oss_reference(layer: mb.MoELayer, k: int, expert=None):
    """gpt-oss's routing around ``expert(i, x)`` (default: its own clamped expert)."""
    w_router, b_r = layer.router.scorer.weight_ED, layer.router.scorer.bias_E
    expert = gpt_oss_expert(layer.experts) if expert is None else expert

    # gpt-oss model card (OpenAI 2025), MoE block: logits = w_router x + b_r; the top-4
    # experts by logit are weighted by the softmax over those 4 logits.
    def forward(x_TD: Tensor) -> Tensor:
        rows = []
        for x in x_TD:
            logits = w_router @ x + b_r
            chosen = topk(logits, k)
            w = torch.softmax(logits[chosen], dim=0)
            rows.append(sum(w[j] * expert(i, x) for j, i in enumerate(chosen)))
        return torch.stack(rows)

    return forward


def test_gpt_oss() -> None:
    torch.manual_seed(5)
    D, E, F, k = 16, 16, 6, 4
    layer = gpt_oss(D, E, F, k)
    with torch.no_grad():
        for p in (layer.router.scorer.bias_E, layer.experts.b_in_EF2, layer.experts.b_out_ED):
            p.normal_()
    x = tokens(10, D, 6, scale=10.0)  # large enough that both clamps act
    compare(layer, gpt_oss_reference(layer, k), x)
    h = torch.einsum("td,edf->tef", x, layer.experts.w_in_EDF2) + layer.experts.b_in_EF2
    assert bool((h[..., :F] > LIMIT).any())
    assert bool((h[..., F:].abs() > LIMIT).any())


# ----------------------------------------------------------------------------- Switch


def switch(D: int, E: int, F: int, factor: float) -> mb.MoELayer:
    """Switch Transformer: top-1 of a softmax, raw gate, capacity factor, ReLU experts."""
    router = mb.Router(mb.LinearScorer(D, E), 1)  # k=1 keeps the raw probability
    experts = mb.MLPExperts(E, D, F, activation="relu")
    losses = {"balance": mb.LoadBalanceLoss(0.01)}
    capacity = mb.Capacity(factor=factor)
    return mb.MoELayer(router, mb.TorchDispatcher(), experts, losses, capacity=capacity).double()


def relu_expert(bank: mb.MLPExperts):
    """``expert(i, x)``: Switch's ReLU MLP expert ``W_out relu(W_in x)``, native layout."""
    w_in, w_out = bank.w_in_EDF.transpose(1, 2), bank.w_out_EFD.transpose(1, 2)
    return lambda i, x: w_out[i] @ torch.relu(w_in[i] @ x)


def switch_reference(layer: mb.MoELayer, capacity: int, expert=None):
    """Switch routing with a capacity of ``capacity`` tokens per expert in the whole call,
    around ``expert(i, x)`` (default: its ReLU MLP)."""
    w_router, E = layer.router.scorer.weight_ED, layer.num_experts
    expert = relu_expert(layer.experts) if expert is None else expert

    # Fedus et al. (2022), sec. 2.1-2.2: p = softmax(w_router x), i = argmax p,
    # y = p_i E_i(x); tokens claim places in order; an overflowing token skips the layer
    # (only the residual carries it).
    def forward(x_TD: Tensor) -> Tensor:
        used, rows = [0] * E, []
        for x in x_TD:
            p = torch.softmax(w_router @ x, dim=0)
            i = topk(p, 1)[0]
            if used[i] < capacity:
                used[i] += 1
                rows.append(p[i] * expert(i, x))
            else:
                rows.append(torch.zeros_like(x))
        return torch.stack(rows)

    return forward


def test_switch() -> None:
    torch.manual_seed(6)
    D, E, F, T, factor = 12, 4, 10, 16, 1.25
    layer = switch(D, E, F, factor)
    with torch.no_grad():
        layer.router.scorer.weight_ED[0] += 0.5  # overload expert 0 so tokens overflow
    w_router = layer.router.scorer.weight_ED
    # Expert capacity = (tokens per batch / experts) × capacity factor (here 16 / 4 × 1.25
    # = 5, an integer, so no rounding convention enters).
    capacity = int(T / E * factor)
    x = tokens(T, D, 7)
    res = compare(layer, switch_reference(layer, capacity), x)
    assert int(res.routing.num_dropped) > 0
    # Eq. 4-6: loss = α · N · Σ_i f_i · P_i, f_i the fraction of tokens dispatched to
    # expert i (by argmax, before any capacity drop), P_i the mean router probability.
    p_TE = torch.softmax(x @ w_router.T, dim=-1)
    f_E = torch.bincount(p_TE.argmax(-1), minlength=E).double() / T
    expected = 0.01 * E * (f_E * p_TE.mean(0)).sum()
    torch.testing.assert_close(res.aux_losses["balance"], expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------- Llama 4


def llama4(D: int, E: int, F: int, k: int) -> mb.MoELayer:
    """Llama 4: sigmoid of the top logits scales the expert *input*; a shared expert."""
    weights = mb.WeightPolicy(renormalize="never")
    router = mb.Router(mb.LinearScorer(D, E), k, scoring="sigmoid", weights=weights)
    shared = mb.SharedExperts(mb.SwiGLUExperts(1, D, F))
    experts = mb.SwiGLUExperts(E, D, F)
    return mb.MoELayer(
        router, mb.TorchDispatcher(), experts, shared=shared, weight_inputs=True
    ).double()


def llama4_reference(layer: mb.MoELayer, k: int):
    w_router = layer.router.scorer.weight_ED
    w1, w3, w2 = native_swiglu(layer.experts)
    shared = [w[0] for w in native_swiglu(layer.shared.experts)]

    # Llama 4 model card / reference MoE: scores = σ(top-k router logits); the routed
    # input of expert i is x · σ(l_i); the expert outputs are summed unweighted and
    # added to the shared expert's output.
    def forward(x_TD: Tensor) -> Tensor:
        rows = []
        for x in x_TD:
            logits = w_router @ x
            routed = sum(
                swiglu(x * torch.sigmoid(logits[i]), w1[i], w3[i], w2[i]) for i in topk(logits, k)
            )
            rows.append(routed + swiglu(x, *shared))
        return torch.stack(rows)

    return forward


def test_llama4() -> None:
    torch.manual_seed(7)
    D, E, F = 16, 16, 8
    for k in (1, 2):  # Scout and Maverick route to 1 expert; k=2 checks the sum
        layer = llama4(D, E, F, k)
        compare(layer, llama4_reference(layer, k), tokens(9, D, 8 + k))
