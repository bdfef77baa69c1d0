"""Balance losses of the modern architectures against direct transcriptions.

Legend: B sequences, S tokens per sequence, T = B·S tokens, E experts, K experts per
token.

- :class:`moeblocks.SequenceBalanceLoss` against DeepSeek-V3's sequence-wise formula,
  written as a loop over sequences and tokens.
- :class:`moeblocks.LoadBalanceLoss` with ``fractions="tokens"`` (K times the default),
  and with a process group (global-batch counts, local probabilities) on two gloo ranks.
- :meth:`moeblocks.TokenStats.pooled` and ``TokenStats.__add__`` against statistics of
  the concatenated tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from gloo import run_ranks
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import moeblocks as mb

# Float64 on both sides, same formula, different summation order (per-token loops
# against batched sums of at most a few hundred terms): ~1e-14 relative at worst.
RTOL, ATOL = 1e-10, 1e-12


def deepseek_sequence_loss(
    probs_TE: Tensor, experts_TK: Tensor, seq_len: int, mask_T: Tensor | None
) -> Tensor:
    """DeepSeek-V3 technical report, eqs. 17-20, averaged over the sequences.

    Per sequence of T' real tokens:  L = Σ_i f_i P_i,
    f_i = N_r / (K_r T') Σ_t 1(expert i among token t's top K_r),
    s'_{i,t} = s_{i,t} / Σ_j s_{j,t},   P_i = (1/T') Σ_t s'_{i,t}.
    Sequences without a real token are left out; with none at all the loss is 0.
    """
    T, E = probs_TE.shape
    K = experts_TK.shape[1]
    per_sequence = []
    for start in range(0, T, max(seq_len, 1)):
        real = [t for t in range(start, start + seq_len) if mask_T is None or bool(mask_T[t])]
        if not real:
            continue
        n = len(real)
        chosen = [set(experts_TK[t].tolist()) for t in real]
        loss = probs_TE.new_zeros(())
        for i in range(E):
            f_i = E / (K * n) * sum(i in c for c in chosen)
            prob_i = sum(probs_TE[t, i] / probs_TE[t].sum() for t in real) / n
            loss = loss + f_i * prob_i
        per_sequence.append(loss)
    if not per_sequence:
        return probs_TE.new_zeros(())
    return torch.stack(per_sequence).mean()


def layer_with(losses: dict, E: int, k: int, scoring: str, dim: int = 5) -> mb.MoELayer:
    router = mb.Router(mb.LinearScorer(dim, E), k, scoring=scoring)
    return mb.MoELayer(router, mb.TorchDispatcher(), mb.MLPExperts(E, dim, 3), losses).double()


@st.composite
def sequence_cases(draw: st.DrawFn) -> dict:
    E = draw(st.integers(1, 8))
    return {
        "leading": draw(
            st.sampled_from([(0,), (1,), (9,), (2, 0), (1, 1), (3, 4), (2, 1), (2, 3, 5)])
        ),
        "E": E,
        "k": draw(st.integers(1, min(E, 3))),
        "scoring": draw(st.sampled_from(["softmax", "sigmoid", "softmax_topk"])),
        "mask": draw(st.sampled_from([None, 0.7, 0.3])),
        "seed": draw(st.integers(0, 2**16)),
    }


@given(sequence_cases())
def test_sequence_balance_loss_matches_deepseek_formula(case: dict) -> None:
    torch.manual_seed(case["seed"])
    layer = layer_with({"seq": mb.SequenceBalanceLoss(weight=0.5)}, **_pick(case))
    shape = case["leading"]
    x = torch.randn(*shape, 5, dtype=torch.float64)
    mask = None if case["mask"] is None else torch.rand(shape) < case["mask"]
    res = layer(x, mask=mask)
    seq_len = shape[-1] if len(shape) >= 2 else x.shape[0]
    flat_mask = None if mask is None else mask.reshape(-1)
    expected = deepseek_sequence_loss(res.routing.probs, res.routing.experts, seq_len, flat_mask)
    torch.testing.assert_close(res.aux_losses["seq"], 0.5 * expected, rtol=RTOL, atol=ATOL)
    # The gradient reaches the router through P only (f counts choices).
    w = layer.router.scorer.weight_ED
    if expected.requires_grad:
        (got,) = torch.autograd.grad(res.aux_losses["seq"], w, retain_graph=True, allow_unused=True)
        (want,) = torch.autograd.grad(0.5 * expected, w, allow_unused=True)
        got = torch.zeros_like(w) if got is None else got
        want = torch.zeros_like(w) if want is None else want
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def _pick(case: dict) -> dict:
    return {"E": case["E"], "k": case["k"], "scoring": case["scoring"]}


def test_sequence_balance_loss_is_one_for_uniform_routing() -> None:
    B, S, E, K = 3, 8, 4, 2
    # Equal scores: every probability is 1/E (sigmoid: 1/2 each, 1/E after normalising);
    # token t takes experts (2t, 2t+1) mod 4, so every expert gets S·K/E slots.
    experts_TK = torch.tensor([[(K * t + j) % E for j in range(K)] for t in range(B * S)])
    for probs in (torch.full((B * S, E), 1 / E), torch.full((B * S, E), 0.5)):
        routing = mb.Routing(
            torch.zeros(B * S, E), probs, experts_TK, torch.ones(B * S, K), batch_shape=(B, S)
        )
        value = mb.SequenceBalanceLoss()(routing)
        # f_i = E/(K·S) · S·K/E = 1 and P_i = 1/E: L = Σ_i 1/E = 1, up to float32 rounding.
        torch.testing.assert_close(value, torch.tensor(1.0), rtol=1e-6, atol=0)


def test_sequence_balance_loss_is_per_sequence() -> None:
    # Sequence 0 sends everything to expert 0, sequence 1 to expert 1: each sequence is
    # maximally unbalanced (L = E · P_0 = E · 1), although the batch as a whole is
    # balanced. A batch-wise loss would see f = (1/2, 1/2): L = 2 · (1/2 · 1/2) · 2 = 1.
    E = 2
    probs = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4, dtype=torch.float64)
    experts = torch.tensor([[0]] * 4 + [[1]] * 4)
    routing = mb.Routing(probs.log(), probs, experts, torch.ones(8, 1, dtype=torch.float64))
    loss = mb.SequenceBalanceLoss()
    split = loss(dataclasses.replace(routing, batch_shape=(2, 4)))
    assert split.item() == pytest.approx(E)
    assert loss(routing).item() == pytest.approx(1.0)


def test_sequence_balance_loss_masks() -> None:
    torch.manual_seed(0)
    layer = layer_with({"seq": mb.SequenceBalanceLoss(weight=1.0)}, 6, 2, "sigmoid")
    x = torch.randn(3, 5, 5, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False  # a fully padded sequence is left out of the mean
    mask[2, 3:] = False
    res = layer(x, mask=mask)
    expected = deepseek_sequence_loss(res.routing.probs, res.routing.experts, 5, mask.reshape(-1))
    torch.testing.assert_close(res.aux_losses["seq"], expected, rtol=RTOL, atol=ATOL)
    only_real = layer(x[[0, 2]], mask=mask[[0, 2]]).aux_losses["seq"]
    torch.testing.assert_close(res.aux_losses["seq"], only_real, rtol=RTOL, atol=ATOL)
    none = layer(x, mask=torch.zeros(3, 5, dtype=torch.bool)).aux_losses["seq"]
    assert none.item() == 0.0
    assert none.requires_grad


def make_routing(
    E: int, k: int, T: int, seed: int, masked: bool
) -> tuple[mb.Routing, Tensor | None]:
    """Softmax top-k routing of T random tokens, and maybe a random padding mask."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, E, generator=gen, dtype=torch.float64)
    probs = scores.softmax(-1)
    experts = probs.topk(k, dim=-1).indices
    routing = mb.Routing(scores, probs, experts, probs.gather(1, experts))
    return routing, (torch.rand(T, generator=gen) < 0.6 if masked else None)


# (T, seed, masked); records are built in the test, outside hypothesis' draw (building a
# record runs the beartype hook, which samples with the random module).
routing_args = st.tuples(st.integers(0, 12), st.integers(0, 2**16), st.booleans())


@given(st.data())
def test_load_balance_token_fractions_are_k_times_slots(data: st.DataObject) -> None:
    E = data.draw(st.integers(1, 8))
    k = data.draw(st.integers(1, E))
    routing, mask = make_routing(E, k, *data.draw(routing_args))
    slots = mb.LoadBalanceLoss(fractions="slots")(routing, mask)
    tokens = mb.LoadBalanceLoss(fractions="tokens")(routing, mask)
    # Same float64 sums, one extra multiplication by K/1 (k_sum / num_tokens).
    torch.testing.assert_close(tokens, k * slots, rtol=RTOL, atol=ATOL)
    stats = mb.TokenStats.of(routing, mask)
    n = int(stats.num_tokens)
    if n:
        torch.testing.assert_close(stats.token_fractions.sum(), torch.tensor(float(k)).double())
        # The token fraction of e: real tokens that chose e, over real tokens.
        m = torch.ones(routing.num_tokens, dtype=torch.bool) if mask is None else mask
        chose_E = torch.stack([(routing.experts[m] == e).any(-1).sum() for e in range(E)])
        torch.testing.assert_close(stats.token_fractions, chose_E.double() / n)


def _concat(parts: list[tuple[mb.Routing, Tensor | None]]) -> tuple[mb.Routing, Tensor]:
    def cat(field: str) -> Tensor:
        return torch.cat([getattr(r, field) for r, _ in parts])

    masks = [torch.ones(r.num_tokens, dtype=torch.bool) if m is None else m for r, m in parts]
    whole = mb.Routing(cat("scores"), cat("probs"), cat("experts"), cat("weights"))
    return whole, torch.cat(masks)


@given(st.data())
def test_pooled_stats_equal_stats_of_the_concatenation(data: st.DataObject) -> None:
    E = data.draw(st.integers(1, 6))
    k = data.draw(st.integers(1, E))
    drawn = data.draw(st.lists(routing_args, min_size=1, max_size=4))
    parts = [make_routing(E, k, *args) for args in drawn]
    pooled = mb.TokenStats.pooled([r for r, _ in parts], [m for _, m in parts])
    whole = mb.TokenStats.of(*_concat(parts))
    for name in ("prob_sum", "slot_count", "z2_sum", "num_tokens", "k_sum"):
        # Float64 sums of at most 48 terms in another order.
        torch.testing.assert_close(
            getattr(pooled, name), getattr(whole, name), rtol=RTOL, atol=ATOL, msg=name
        )
    added = mb.TokenStats.of(*parts[0])
    for part in parts[1:]:
        added = added + mb.TokenStats.of(*part)
    torch.testing.assert_close(added.to_vector(), pooled.to_vector(), rtol=0, atol=0)
    loss = mb.LoadBalanceLoss(fractions="tokens")
    routing, mask = _concat(parts)
    torch.testing.assert_close(loss.from_stats(pooled), loss(routing, mask), rtol=RTOL, atol=ATOL)


def test_pooled_stats_with_different_k() -> None:
    # Records with different k (e.g. an explicit k per call): slot fractions count every
    # routed slot once (so they sum to 1), token fractions count the tokens that chose
    # each expert (so they sum to the mean K); k_sum adds the K of every token.
    gen = torch.Generator().manual_seed(0)
    records = []
    for T, k in ((5, 1), (7, 3)):
        probs = torch.randn(T, 4, generator=gen, dtype=torch.float64).softmax(-1)
        experts = probs.topk(k, -1).indices
        records.append(mb.Routing(probs.log(), probs, experts, probs.gather(1, experts)))
    pooled = mb.TokenStats.pooled(records)
    assert pooled.num_tokens.item() == 12
    assert pooled.k_sum.item() == 5 + 21
    chose_E = sum(torch.bincount(r.experts.reshape(-1), minlength=4).double() for r in records)
    torch.testing.assert_close(pooled.slot_fractions, chose_E / 26)
    torch.testing.assert_close(pooled.token_fractions, chose_E / 12)
    torch.testing.assert_close(pooled.slot_fractions.sum(), torch.tensor(1.0).double())
    torch.testing.assert_close(pooled.token_fractions.sum(), torch.tensor(26 / 12).double())


def _tiny_routing() -> mb.Routing:
    probs = torch.full((2, 3), 1 / 3)
    return mb.Routing(probs.log(), probs, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: mb.LoadBalanceLoss(fractions="experts"), "fractions must be 'slots' or"),
        (lambda: mb.LoadBalanceLoss(weight=-1.0), "weight must be a finite number >= 0"),
        (lambda: mb.SequenceBalanceLoss(weight=float("nan")), "weight must be a finite"),
        (lambda: mb.TokenStats.pooled([]), "at least one Routing record"),
        (lambda: mb.TokenStats.pooled([_tiny_routing()], [None, None]), "got 2 masks for 1"),
    ],
)
def test_bad_arguments(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------- global-batch balance over gloo

_RANK_CODE = """
gen = torch.Generator().manual_seed(rank)
scores = torch.randn(5 + 3 * rank, 4, generator=gen, dtype=torch.float64, requires_grad=True)
probs = scores.softmax(-1)
experts = probs.topk(2, -1).indices
routing = mb.Routing(scores, probs, experts, probs.gather(1, experts))
value = mb.LoadBalanceLoss(1.0, group=dist.group.WORLD)(routing, torch.nn.Identity())
value.backward()
torch.save({"scores": scores.detach(), "value": value.detach(), "grad": scores.grad},
           sys.argv[1])
"""


def test_load_balance_group_uses_global_counts_and_local_probs(tmp_path: Path) -> None:
    outs = run_ranks(_RANK_CODE, tmp_path)
    results = [torch.load(outs[r]) for r in range(2)]
    # f from the slots of both ranks together (8 + 16 slots); P from this rank alone.
    experts = [r["scores"].softmax(-1).topk(2, -1).indices for r in results]
    f_E = torch.bincount(torch.cat(experts).reshape(-1), minlength=4).double() / (2 * 13)
    for r in results:
        scores = r["scores"].clone().requires_grad_()
        expected = 4 * (f_E * scores.softmax(-1).mean(0)).sum()
        expected.backward()
        # Same float64 formula; only the order of the sums differs.
        torch.testing.assert_close(r["value"], expected.detach(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(r["grad"], scores.grad, rtol=RTOL, atol=ATOL)
