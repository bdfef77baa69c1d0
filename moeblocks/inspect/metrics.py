"""Routing metrics over an evaluation set.

Utilisation, dead experts, saturation, entropy, per-expert vocabulary, class purity /
NPMI and word-level subtoken coherence.

Legend: T tokens, E experts, K experts per token, V vocabulary, C token classes,
L MoE layers, P token pairs.

Every function reads :class:`~moeblocks.Routing` records (one layer, all evaluation
tokens concatenated, e.g. ``RoutingSet.layers[i]``) and plain tensors, so it works for
any model. A *slot* is one (token, choice) pair; a token routed with k = 2 fills two
slots. Entropies are in nats (natural log): ``log E`` is the uniform maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from moeblocks.routing import Routing

__all__ = [
    "Coherence",
    "LayerSummary",
    "class_counts",
    "dead_experts",
    "expert_counts",
    "expert_token_counts",
    "mean_k",
    "npmi",
    "purity",
    "router_saturation",
    "routing_entropy",
    "subtoken_coherence",
    "summarise_layer",
    "top_tokens",
    "topk_jaccard",
    "usage_entropy",
    "utilisation",
    "vocabulary_entropy",
]


def _chosen(routing: Routing, top1: bool) -> Int[Tensor, "T K"]:
    return routing.experts[:, :1] if top1 else routing.experts


def _real(routing: Routing, top1: bool) -> Bool[Tensor, "T K"]:
    """Which slots of :func:`_chosen` are real (dynamic k: the empty ones are not)."""
    if routing.slots is None:
        return torch.ones_like(_chosen(routing, top1), dtype=torch.bool)
    return routing.slots[:, :1] if top1 else routing.slots


def mean_k(routing: Routing) -> float:
    """Mean number of real experts per token: K for a fixed k, less with empty slots."""
    return routing.k_per_token.float().mean().item() if routing.num_tokens else 0.0


def expert_counts(routing: Routing, top1: bool = False) -> Int[Tensor, " E"]:
    """Routed slots per expert: ``c_e = #{(t, j) : experts[t, j] = e}``.

    Args:
        routing: One layer's record.
        top1: Count only each token's first choice (then the counts sum to T, else T·K).

    With dynamic k (``routing.slots``) only the real slots count.
    """
    real_N = _chosen(routing, top1)[_real(routing, top1)]
    return torch.bincount(real_N, minlength=routing.num_experts)


def utilisation(routing: Routing, top1: bool = False) -> Float[Tensor, " E"]:
    """Share of routed slots each expert receives: ``u_e = c_e / Σ_e' c_e'`` (sums to 1).

    Uniform use is ``1/E`` for every expert. All zeros when there are no tokens.
    """
    c_E = expert_counts(routing, top1).float()
    return c_E / c_E.sum().clamp_min(1)


def dead_experts(routing: Routing) -> Bool[Tensor, " E"]:
    """Experts that receive no token in any of its k slots over the whole record."""
    return expert_counts(routing) == 0


def router_saturation(routing: Routing) -> float:
    """Mean top-1 router probability ``mean_t max_e p_te``, in ``[1/E, 1]``.

    ``1/E`` is an undecided router, 1 a fully saturated (one-hot) one.
    """
    if routing.num_tokens == 0:
        return float("nan")
    return routing.probs.max(dim=-1).values.mean().item()


def routing_entropy(routing: Routing) -> float:
    """Mean per-token entropy of the router distribution, ``mean_t −Σ_e p_te log p_te``, nats.

    0 is a one-hot router, ``log E`` a uniform one.
    """
    if routing.num_tokens == 0:
        return float("nan")
    p_TE = routing.probs
    return (-(p_TE * p_TE.clamp_min(1e-30).log()).sum(-1)).mean().item()


def usage_entropy(routing: Routing) -> float:
    """Entropy of the utilisation ``−Σ_e u_e log u_e``, nats (``log E`` = perfectly balanced)."""
    u_E = utilisation(routing)
    return (-(u_E * u_E.clamp_min(1e-30).log())).sum().item()


@dataclass(frozen=True)
class LayerSummary:
    """Headline routing statistics of one layer.

    Attributes:
        utilisation: Share of slots per expert (sums to 1).
        dead: Indices of experts that got no token.
        dead_fraction: ``len(dead) / E``, a fraction in [0, 1].
        saturation: Mean top-1 probability, in [1/E, 1].
        entropy: Mean per-token router entropy, nats.
        usage_entropy: Entropy of the utilisation, nats.
        max_entropy: ``log E``, nats, for scale.
        mean_k: Mean real experts per token (:func:`mean_k`): K for a fixed k.
    """

    utilisation: Float[Tensor, " E"]
    dead: list[int]
    dead_fraction: float
    saturation: float
    entropy: float
    usage_entropy: float
    max_entropy: float
    mean_k: float = 0.0


def summarise_layer(routing: Routing) -> LayerSummary:
    """All of :func:`utilisation`, :func:`dead_experts`, saturation and entropies at once."""
    dead_E = dead_experts(routing)
    E = routing.num_experts
    return LayerSummary(
        utilisation(routing),
        dead_E.nonzero().flatten().tolist(),
        dead_E.float().mean().item(),
        router_saturation(routing),
        routing_entropy(routing),
        usage_entropy(routing),
        math.log(E),
        mean_k(routing),
    )


# --- vocabulary ----------------------------------------------------------------------


def _check_rows(routing: Routing, name: str, values: Tensor) -> None:
    if values.ndim != 1 or values.shape[0] != routing.num_tokens:
        raise ValueError(
            f"{name} must have shape [{routing.num_tokens}] (one per routed token), "
            f"got {tuple(values.shape)}"
        )


def expert_token_counts(
    routing: Routing, token_ids: Int[Tensor, " T"], vocab_size: int, top1: bool = True
) -> Int[Tensor, "E V"]:
    """How often each token id is routed to each expert: ``n_ev``.

    Args:
        routing: One layer's record.
        token_ids: Input token id of every row, in ``[0, vocab_size)``.
        vocab_size: V.
        top1: Count each token once, for its first choice; else once per slot.
    """
    _check_rows(routing, "token_ids", token_ids)
    E = routing.num_experts
    chosen_TK = _chosen(routing, top1)
    ids_TK = token_ids.long().reshape(-1, 1).expand_as(chosen_TK)
    flat = (chosen_TK * vocab_size + ids_TK)[_real(routing, top1)]
    return torch.bincount(flat, minlength=E * vocab_size).view(E, vocab_size)


def top_tokens(counts_EV: Int[Tensor, "E V"], n: int = 10) -> list[list[tuple[int, int]]]:
    """Per expert, its ``n`` most frequent token ids as ``(id, count)``, zero counts dropped."""
    vals, ids = counts_EV.topk(min(n, counts_EV.shape[1]), dim=-1)
    return [
        [(int(i), int(c)) for i, c in zip(row_i, row_c, strict=True) if c > 0]
        for row_i, row_c in zip(ids, vals, strict=True)
    ]


def vocabulary_entropy(counts_EV: Int[Tensor, "E V"]) -> Float[Tensor, " E"]:
    """Entropy of each expert's token distribution, in nats.

    ``h_e = −Σ_v q_ev log q_ev`` with ``q_ev = n_ev / Σ_v n_ev``. Low: a specialist;
    ``log V``: uniform. NaN for an expert that received no token.
    """
    n_EV = counts_EV.float()
    tot_E1 = n_EV.sum(-1, keepdim=True)
    q_EV = n_EV / tot_E1.clamp_min(1)
    h_E = -(q_EV * q_EV.clamp_min(1e-30).log()).sum(-1)
    return torch.where(tot_E1.squeeze(-1) > 0, h_E, torch.full_like(h_E, float("nan")))


def class_counts(
    routing: Routing, classes: Int[Tensor, " T"], num_classes: int, top1: bool = True
) -> Int[Tensor, "E C"]:
    """Co-occurrence counts ``n_ec`` of experts and token classes.

    Args:
        routing: One layer's record.
        classes: Class of every token in ``[0, num_classes)``, or -1 for tokens of no
            known class (left out).
        num_classes: C.
        top1: Count each token once, for its first choice; else once per slot.
    """
    _check_rows(routing, "classes", classes)
    if classes.numel() and (classes.min() < -1 or classes.max() >= num_classes):
        raise ValueError(f"classes must lie in [-1, {num_classes}), got values outside")
    E = routing.num_experts
    chosen_TK = _chosen(routing, top1)
    cls_TK = classes.long().reshape(-1, 1).expand_as(chosen_TK)
    keep = (cls_TK >= 0) & _real(routing, top1)
    flat = (chosen_TK * num_classes + cls_TK)[keep]
    return torch.bincount(flat, minlength=E * num_classes).view(E, num_classes)


def purity(counts_EC: Int[Tensor, "E C"]) -> tuple[Float[Tensor, " E"], float]:
    """Class purity of experts.

    Per expert ``max_c n_ec / Σ_c n_ec`` (NaN for an unused expert), and overall the
    cluster purity ``Σ_e max_c n_ec / Σ_ec n_ec``; both fractions in [1/C, 1].
    """
    n_EC = counts_EC.float()
    tot_E = n_EC.sum(-1)
    max_E = n_EC.max(-1).values
    per_E = torch.where(tot_E > 0, max_E / tot_E.clamp_min(1), torch.full_like(tot_E, math.nan))
    overall = (max_E.sum() / tot_E.sum()).item() if tot_E.sum() > 0 else math.nan
    return per_E, overall


def npmi(counts_EC: Int[Tensor, "E C"]) -> Float[Tensor, "E C"]:
    """Normalised pointwise mutual information of expert e and class c, in [-1, 1].

    ``npmi = log(p(e,c) / (p(e) p(c))) / −log p(e,c)`` with probabilities estimated
    from the counts. 1: e and c always occur together; 0: independent; -1: never
    together (``p(e,c) = 0``). Rows or columns with no counts give NaN.
    """
    n_EC = counts_EC.double()
    N = n_EC.sum()
    p_EC = n_EC / N.clamp_min(1)
    p_E1 = p_EC.sum(-1, keepdim=True)
    p_C = p_EC.sum(0, keepdim=True)
    pmi = (p_EC / (p_E1 * p_C)).log()
    denom = -p_EC.log()
    out = pmi / denom
    out = torch.where(p_EC >= 1, torch.ones_like(out), out)  # p(e,c)=1: perfect association
    out = torch.where(p_EC == 0, -torch.ones_like(out), out)
    undefined = (p_E1 == 0) | (p_C == 0)
    return torch.where(undefined, torch.full_like(out, math.nan), out).float()


# --- subtoken coherence ---------------------------------------------------------------


def topk_jaccard(
    a: Int[Tensor, "P K"], b: Int[Tensor, "P K2"], num_experts: int
) -> Float[Tensor, " P"]:
    """Jaccard index ``|A ∩ B| / |A or B|`` of the expert sets in each row pair."""
    oh_a = torch.zeros(a.shape[0], num_experts, dtype=torch.bool)
    oh_b = torch.zeros(b.shape[0], num_experts, dtype=torch.bool)
    oh_a.scatter_(1, a.long().cpu(), True)
    oh_b.scatter_(1, b.long().cpu(), True)
    inter = (oh_a & oh_b).sum(-1).float()
    union = (oh_a | oh_b).sum(-1).float()
    return inter / union.clamp_min(1)


@dataclass(frozen=True)
class Coherence:
    """Do the pieces of one word go to the same experts?

    Attributes:
        top1_agreement: Fraction of adjacent piece pairs of one word whose top-1 expert
            is the same, in [0, 1].
        jaccard: Mean Jaccard index of the two pieces' top-k expert sets, in [0, 1].
        baseline_top1: The same for random token pairs (shuffled baseline).
        baseline_jaccard: The same for random token pairs.
        num_pairs: Adjacent within-word piece pairs P measured.
    """

    top1_agreement: float
    jaccard: float
    baseline_top1: float
    baseline_jaccard: float
    num_pairs: int


def subtoken_coherence(
    routing: Routing, word_ids: Int[Tensor, " T"], num_shuffles: int = 10, seed: int = 0
) -> Coherence:
    """Word-level subtoken coherence against a shuffled baseline.

    Pairs are adjacent rows ``(t, t+1)`` with ``word_ids[t] == word_ids[t+1] >= 0``: two
    consecutive pieces of one multi-piece word. The baseline pairs each first piece with
    a uniformly random row instead, averaged over ``num_shuffles`` draws, so it measures
    the agreement expected from utilisation alone.

    Args:
        routing: One layer's record.
        word_ids: Word index of every row (any ids; equal neighbours = one word), -1 for
            rows that belong to no word.
        num_shuffles: Random draws for the baseline.
        seed: Seed of the baseline draws.
    """
    _check_rows(routing, "word_ids", word_ids)
    w = word_ids.long()
    same = (w[1:] == w[:-1]) & (w[:-1] >= 0)
    first_P = same.nonzero().flatten()
    second_P = first_P + 1
    E = routing.num_experts
    ex_TK = routing.experts
    if first_P.numel() == 0:
        nan = float("nan")
        return Coherence(nan, nan, nan, nan, 0)
    top1 = (ex_TK[first_P, 0] == ex_TK[second_P, 0]).float().mean().item()
    jac = topk_jaccard(ex_TK[first_P], ex_TK[second_P], E).mean().item()
    g = torch.Generator().manual_seed(seed)
    b_top1, b_jac = 0.0, 0.0
    for _ in range(num_shuffles):
        rand_P = torch.randint(0, routing.num_tokens, (first_P.numel(),), generator=g)
        b_top1 += (ex_TK[first_P, 0] == ex_TK[rand_P, 0]).float().mean().item()
        b_jac += topk_jaccard(ex_TK[first_P], ex_TK[rand_P], E).mean().item()
    n = max(num_shuffles, 1)
    return Coherence(top1, jac, b_top1 / n, b_jac / n, int(first_P.numel()))
