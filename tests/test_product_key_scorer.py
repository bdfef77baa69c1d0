"""ProductKeyScorer: ``n²`` expert scores from ``2n`` key logits (Doge's router).

A float64 per-token reference written from the formula (``score[i·n + j] = a_i + b_j``,
the halves a token's own, or the batch's key logits read as ``[2, T, n]``), the argument
checks, and a router on it against a per-token reference over hypothesis-drawn shapes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeblocks as mb


def _reference(tokens: torch.Tensor, weight: torch.Tensor, pairing: str) -> torch.Tensor:
    T, n = tokens.shape[0], weight.shape[0] // 2
    keys = [[sum(w * x for w, x in zip(row, tok, strict=True)) for row in weight.tolist()]
            for tok in tokens.tolist()]  # fmt: skip
    flat = [v for row in keys for v in row]  # the [T, 2n] logits, row-major
    scores = []
    for t in range(T):
        if pairing == "token":
            a, b = keys[t][:n], keys[t][n:]
        else:  # the same memory read as [2, T, n]
            a, b = flat[t * n : (t + 1) * n], flat[(T + t) * n : (T + t + 1) * n]
        scores.append([a[i] + b[j] for i in range(n) for j in range(n)])
    return torch.tensor(scores, dtype=torch.float64).reshape(T, n * n)


@pytest.mark.parametrize("pairing", ["token", "batch"])
def test_scores_match_the_formula(pairing: str) -> None:
    torch.manual_seed(0)
    scorer = mb.ProductKeyScorer(5, 3, pairing).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    got = scorer(x)
    assert got.shape == (7, 9)
    assert (scorer.dim, scorer.num_experts) == (5, 9)
    # float64: one dot product and one sum per score, a few ulps apart from the loop.
    want = _reference(x, scorer.weight_KD.detach(), pairing)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_batch_pairing_mixes_tokens_and_token_pairing_does_not() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 4, dtype=torch.float64)
    token = mb.ProductKeyScorer(4, 2, "token").double()
    # A matmul of one row and of six may round apart (float64 ulps).
    torch.testing.assert_close(token(x[1:2]), token(x)[1:2], rtol=1e-14, atol=1e-14)
    batch = mb.ProductKeyScorer(4, 2, "batch").double()
    assert not torch.allclose(batch(x[1:2]), batch(x)[1:2]), "token 1 reads tokens 0 and 3"


def test_float32_tokens_give_float32_scores() -> None:
    scorer = mb.ProductKeyScorer(4, 2)
    assert scorer(torch.randn(3, 4)).dtype == torch.float32
    assert scorer.compute_dtype == "input"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 0, "num_keys": 2}, "dim must be an int >= 1"),
        ({"dim": 4, "num_keys": 0}, "num_keys must be an int >= 1"),
        ({"dim": 4, "num_keys": 2, "pairing": "pairs"}, "pairing must be one of"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mb.ProductKeyScorer(**kwargs)


def test_tokens_of_another_dim_are_refused() -> None:
    with pytest.raises(ValueError, match="4"):
        mb.ProductKeyScorer(4, 2)(torch.randn(3, 5))


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 5),
    n=st.integers(1, 3),
    K=st.integers(1, 4),
    pairing=st.sampled_from(["token", "batch"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_a_router_on_product_keys_matches_a_per_token_reference(
    T: int, n: int, K: int, pairing: str, dtype: torch.dtype, seed: int
) -> None:
    K = min(K, n * n)
    torch.manual_seed(seed)
    scorer = mb.ProductKeyScorer(4, n, pairing).to(dtype)
    router = mb.Router(scorer, K, scoring="softmax_topk", weights=mb.WeightPolicy("never"))
    x = torch.randn(T, 4, dtype=dtype)
    routing = router(x)
    want = _reference(x.double(), scorer.weight_KD.detach().double(), pairing)
    # float32 inputs: one rounding per dot product and sum (~1e-6); float64: ulps.
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(routing.scores.detach().double(), want, rtol=tol, atol=tol)
    for t in range(T):
        chosen = routing.scores[t].detach()[routing.experts[t]]
        assert chosen.min() >= routing.scores[t].detach().topk(K).values.min()
        torch.testing.assert_close(routing.weights[t], torch.softmax(chosen, -1), rtol=0, atol=0)
