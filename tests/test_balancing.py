"""BiasBalancer: DeepSeek-V3's auxiliary-loss-free balancing by a selection-only bias.

Legend: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gloo import run_ranks
from torch import nn

import moeblocks as mb


def router_with_balancer(E: int = 6, k: int = 2, rate: float = 0.1, **kwargs) -> mb.Router:
    torch.manual_seed(0)
    return mb.Router(mb.LinearScorer(5, E), k, balancer=mb.BiasBalancer(E, rate), **kwargs)


def test_step_applies_the_sign_rule_exactly_and_resets_the_load() -> None:
    balancer = mb.BiasBalancer(4, rate=0.25)
    balancer.observe(torch.tensor([[0, 2], [0, 3]]))
    balancer.observe(torch.tensor([[0, 2], [0, 3]]))  # loads add up: [4, 0, 2, 2]
    assert balancer.load.tolist() == [4.0, 0.0, 2.0, 2.0]
    used = balancer.step()
    # bias += rate · sign(mean(load) − load) with mean 2: overloaded down, idle up, the
    # two at the mean unchanged. 0.25 is exact in binary, so the comparison is exact.
    assert used.tolist() == [4.0, 0.0, 2.0, 2.0]
    assert balancer.bias.tolist() == [-0.25, 0.25, 0.0, 0.0]
    assert balancer.load.tolist() == [0.0] * 4
    balancer.observe(torch.tensor([[1], [1], [1]]))
    balancer.step()
    assert balancer.bias.tolist() == [0.0, 0.0, 0.25, 0.25]
    balancer.step()  # no load at all: every expert is at the mean, nothing moves
    assert balancer.bias.tolist() == [0.0, 0.0, 0.25, 0.25]


def test_rate_zero_freezes_the_bias() -> None:
    router = router_with_balancer(rate=0.0)
    for _ in range(3):
        router(torch.randn(20, 5))
        assert router.balancer.load.sum().item() == 40  # still counted
        mb.step_balancers(router)
    assert not router.balancer.bias.any()


def test_loads_are_observed_in_training_mode_only() -> None:
    router = router_with_balancer()
    x = torch.randn(30, 5)
    router.eval()
    router(x)
    assert not router.balancer.load.any()
    router.train()
    routing = router(x)
    counts = torch.bincount(routing.experts.reshape(-1), minlength=6).float()
    assert torch.equal(router.balancer.load, counts)
    router(x, k=1)  # an explicit k counts its own slots
    assert router.balancer.load.sum().item() == 30 * 2 + 30


def test_state_dict_round_trip() -> None:
    layer = mb.MoELayer(router_with_balancer(), mb.TorchDispatcher(), mb.SwiGLUExperts(6, 5, 4))
    layer(torch.randn(40, 5))
    mb.step_balancers(layer)
    layer(torch.randn(10, 5))  # a pending load, not yet stepped
    state = layer.state_dict()
    assert {"router.balancer.bias", "router.balancer.load"} <= set(state)
    fresh = mb.MoELayer(router_with_balancer(), mb.TorchDispatcher(), mb.SwiGLUExperts(6, 5, 4))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.router.balancer.bias, layer.router.balancer.bias)
    assert torch.equal(fresh.router.balancer.load, layer.router.balancer.load)
    assert fresh.router.balancer.bias.any()
    assert fresh.router.balancer.load.any()
    x = torch.randn(25, 5)
    layer.eval(), fresh.eval()
    assert torch.equal(layer(x).routing.experts, fresh(x).routing.experts)
    # A stand-alone balancer's own state dict holds exactly its two buffers.
    balancer = mb.BiasBalancer(6)
    balancer.load_state_dict(layer.router.balancer.state_dict())
    assert set(balancer.state_dict()) == {"bias", "load"}
    assert torch.equal(balancer.bias, layer.router.balancer.bias)


def test_step_balancers_steps_every_balancer() -> None:
    model = nn.Sequential(
        mb.MoELayer(router_with_balancer(), mb.TorchDispatcher(), mb.SwiGLUExperts(6, 5, 4)),
        nn.Linear(5, 5),
        mb.MoELayer(router_with_balancer(E=4), mb.TorchDispatcher(), mb.SwiGLUExperts(4, 5, 4)),
        mb.MoELayer(
            mb.Router(mb.LinearScorer(5, 4), 1), mb.TorchDispatcher(), mb.MLPExperts(4, 5, 3)
        ),
    )
    x = torch.randn(16, 5)
    for module in model:
        x = module(x).out if isinstance(module, mb.MoELayer) else module(x)
    loads = [model[0].router.balancer.load.clone(), model[2].router.balancer.load.clone()]
    assert mb.step_balancers(model) == 2
    for i, load in zip((0, 2), loads, strict=True):
        balancer = model[i].router.balancer
        assert torch.equal(balancer.bias, 0.1 * torch.sign(load.mean() - load))
        assert not balancer.load.any()
    assert mb.step_balancers(nn.Linear(2, 2)) == 0


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "softmax_topk"])
def test_bias_never_enters_the_combine_weights(scoring: str) -> None:
    router = router_with_balancer(k=3, scoring=scoring, weights=mb.WeightPolicy("always"))
    with torch.no_grad():
        router.balancer.bias.copy_(torch.tensor([10.0, -10.0, 3.0, 0.0, 0.0, 0.0]))
    routing = router(torch.randn(40, 5))
    assert bool((routing.experts[:, 0] == 0).all())
    assert not bool((routing.experts == 1).any())
    # The weights are the unbiased gates of the chosen experts, renormalised.
    if scoring == "softmax_topk":
        gates_TK = torch.softmax(routing.scores.gather(1, routing.experts), dim=-1)
    else:
        gates_TK = routing.probs.gather(1, routing.experts)
    # Only the summation order of the renormalisation may differ (float32 ulps).
    torch.testing.assert_close(
        routing.weights, gates_TK / gates_TK.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7
    )
    # And the probabilities the losses read are the bias-free scoring function.
    expected = torch.sigmoid(routing.scores) if scoring == "sigmoid" else routing.scores.softmax(-1)
    torch.testing.assert_close(routing.probs, expected, rtol=0, atol=0)


def test_bias_updates_alone_balance_a_skewed_router() -> None:
    """No aux loss and no gradient step: only the sign-rule bias moves."""
    torch.manual_seed(0)
    E, D, k, T = 8, 16, 2, 256
    scorer = mb.LinearScorer(D, E, bias=True)
    with torch.no_grad():
        scorer.bias_E[0] = 3.0  # σ(3) ≈ 0.95 against ≈ 0.5: expert 0 takes every token
    weights_before = [p.detach().clone() for p in scorer.parameters()]
    balancer = mb.BiasBalancer(E, rate=0.01)
    router = mb.Router(
        scorer, k, scoring="sigmoid", weights=mb.WeightPolicy("always"), balancer=balancer
    )
    gen = torch.Generator().manual_seed(1)
    fractions = []
    for _ in range(300):
        routing = router(torch.randn(T, D, generator=gen))
        gates_TK = routing.probs.gather(1, routing.experts)
        assert torch.equal(routing.weights, gates_TK / gates_TK.sum(-1, keepdim=True))
        load_E = balancer.step()
        fractions.append(load_E / load_E.sum())
    f_SE = torch.stack(fractions)
    # Step 0: expert 0 is in every token's top 2, i.e. half of all slots (uniform: 1/8).
    assert f_SE[0, 0].item() == 0.5
    # Over the last 50 steps (12,800 tokens) the mean slot fraction of every expert is
    # within 10 % of uniform: one step's loads fluctuate by ~12 % from sampling alone
    # (binomial, 64 expected slots), the average over 50 steps by ~2 %, and the bias
    # oscillates by ±rate around balance. Measured: 0.985–1.018 × uniform.
    last_E = f_SE[-50:].mean(0)
    assert last_E.max().item() < 1.1 / E, last_E
    assert last_E.min().item() > 0.9 / E, last_E
    # The skew added σ(3) − σ(0) ≈ 0.45 to expert 0's key; the bias took most of it back
    # (measured: expert 0 ends 0.38 below the mean of the others).
    bias_E = balancer.bias
    assert (bias_E[1:].mean() - bias_E[0]).item() > 0.3, bias_E
    for before, p in zip(weights_before, scorer.parameters(), strict=True):
        assert torch.equal(before, p)  # the scorer itself never changed


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: mb.BiasBalancer(0), "num_experts must be an int >= 1"),
        (lambda: mb.BiasBalancer(True), "num_experts must be an int >= 1"),
        (lambda: mb.BiasBalancer(4, rate=-0.1), "rate must be a finite number >= 0"),
        (lambda: mb.BiasBalancer(4, rate=float("nan")), "rate must be a finite number >= 0"),
        (lambda: mb.BiasBalancer(4, rate=float("inf")), "rate must be a finite number >= 0"),
        (
            lambda: mb.Router(mb.LinearScorer(5, 6), 2, balancer=mb.BiasBalancer(4)),
            "balancer has 4 experts, the scorer 6",
        ),
    ],
)
def test_bad_arguments(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------ gloo all-reduce

_RANK_CODE = """
balancer = mb.BiasBalancer(4, rate=0.5, group=dist.group.WORLD)
# Rank 0 sends 3 slots to expert 0; rank 1 one slot each to experts 0 and 1. Summed
# loads [4, 1, 0, 0] (mean 1.25); rank 1's local loads alone would give [1, 1, 0, 0].
balancer.observe(torch.tensor([[0], [0], [0]]) if rank == 0 else torch.tensor([[0, 1]]))
used = balancer.step()
torch.save({"bias": balancer.bias, "used": used, "load": balancer.load}, sys.argv[1])
"""


def test_group_sums_the_loads_before_the_update(tmp_path: Path) -> None:
    outs = run_ranks(_RANK_CODE, tmp_path)
    for r in range(2):
        result = torch.load(outs[r])
        assert result["used"].tolist() == [4.0, 1.0, 0.0, 0.0]
        # Every rank applies the same update from the summed loads.
        assert result["bias"].tolist() == [-0.5, 0.5, 0.5, 0.5]
        assert not result["load"].any()
