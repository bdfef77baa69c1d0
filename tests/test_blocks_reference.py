"""The composed blocks against the per-token float64 reference: outputs and every gradient.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token,
S shared experts.

Each case builds a float64 :class:`moeblocks.MoELayer` from the stock router's parts
(scoring function, selection, weight policy, router bias, selection-only bias), an
expert bank (SwiGLU / clamped SwiGLU / MLP with any activation, biases, init), shared
experts, input weighting and capacity, and compares it with
:func:`reference.blocks_layer_forward`, which routes, drops and computes one token and
one choice at a time. The reference also makes the routing decision itself, so the
chosen experts (in order) and the dropped copies are compared exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import blocks_layer_forward, capacity_dropped
from torch import nn

import moeblocks as mb

# Layer and reference both run in float64 and evaluate the same formulas; they differ
# only in the order of additions (batched and grouped matmuls against per-token vector
# products, softmax with and without a max shift), about 1e-16 relative per operation
# over sums of at most a few dozen terms. 1e-10 of the largest value leaves a margin of
# 10^4 over that while any formula error shows at 1e-3 or more; the absolute floor
# covers entries that are exactly zero in the reference.
REL_TOL, ABS_TOL = 1e-10, 1e-12


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    if not expected.numel():
        return
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= REL_TOL * scale + ABS_TOL, f"{what}: max error {err:.3g}, scale {scale:.3g}"


# ------------------------------------------------------------------------ the cases

BASE: dict = {
    "shape": (3, 8),  # leading shape of x; the last entry is the sequence length
    "dim": 6,
    "hidden": 5,
    "num_experts": 6,
    "k": 2,
    "scoring": "softmax",
    "selection": None,  # None: TopK; else (num_groups, groups_per_token, group_score_k)
    "renormalize": "k>1",
    "scale": 1.0,
    "eps": 0.0,
    "router_bias": False,
    "selection_bias": False,  # a BiasBalancer with a random bias
    "bank": "swiglu",  # "swiglu", "clamped" or one of the plain activations (MLP bank)
    "glu": "silu",  # the GLU activation of a "swiglu" bank
    "expert_bias": False,
    "init": None,  # None or (std, out_scale)
    "shared": 0,  # S shared experts (0: none)
    "shared_gate": False,
    "shared_bank": "swiglu",
    "weight_inputs": False,
    "capacity": None,  # None or (factor, limit, per)
    "skew": False,  # tilt the router so that some experts get no token
    "seed": 0,
}


def case(**overrides: object) -> dict:
    unknown = set(overrides) - set(BASE)
    assert not unknown, unknown
    return {**BASE, **overrides}


def build(c: dict) -> mb.MoELayer:
    torch.manual_seed(c["seed"])
    D, F, E, k = c["dim"], c["hidden"], c["num_experts"], c["k"]
    balancer = mb.BiasBalancer(E) if c["selection_bias"] else None
    router = mb.Router(
        mb.LinearScorer(D, E, bias=c["router_bias"]),
        k,
        scoring=c["scoring"],
        selection=mb.GroupLimitedTopK(*c["selection"]) if c["selection"] else None,
        weights=mb.WeightPolicy(c["renormalize"], c["scale"], c["eps"]),
        balancer=balancer,
    )
    init = mb.ExpertInit(*c["init"]) if c["init"] else None
    bias = c["expert_bias"]
    if c["bank"] in ("swiglu", "clamped"):
        act = mb.ClampedSwiGLU(1.702, 0.4) if c["bank"] == "clamped" else mb.GLU(c["glu"])
        experts: nn.Module = mb.SwiGLUExperts(E, D, F, activation=act, bias=bias, init=init)
    else:
        experts = mb.MLPExperts(E, D, F, activation=c["bank"], bias=bias, init=init)
    shared = None
    if c["shared"]:
        S = c["shared"]
        if c["shared_bank"] == "swiglu":
            bank: nn.Module = mb.SwiGLUExperts(S, D, F + 1, bias=bias)
        else:
            bank = mb.MLPExperts(S, D, F + 1, activation="gelu_tanh", bias=bias)
        shared = mb.SharedExperts(bank, gate=c["shared_gate"])
    capacity = None
    if c["capacity"]:
        factor, limit, per = c["capacity"]
        capacity = mb.Capacity(factor=factor, limit=limit, per=per)
    layer = mb.MoELayer(
        router,
        mb.TorchDispatcher(),
        experts,
        shared=shared,
        capacity=capacity,
        weight_inputs=c["weight_inputs"],
    ).double()
    with torch.no_grad():
        # Biases and the shared gate start at zero: randomise them so that every
        # gradient is exercised. The selection bias is of the order of the spread of
        # the selection keys, so it changes choices.
        for name, p in layer.named_parameters():
            if name.startswith("shared.gate") or name.split(".")[-1].startswith("b"):
                p.normal_(0.0, 0.5)
        if balancer is not None:
            spread = 1.0 if c["scoring"] == "softmax_topk" else 0.5 / E**0.5
            balancer.bias.normal_(0.0, spread)
        if c["skew"]:
            layer.router.scorer.weight_ED[0] += 3.0
    return layer


def check_case(c: dict) -> mb.MoELayer:
    """Compare one case with the reference; returns the layer (with its gradients)."""
    layer = build(c)
    reference = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    x = torch.randn(*c["shape"], c["dim"], generator=gen, dtype=torch.float64)
    if c["bank"] == "clamped":
        x = 3 * x  # so that the clamps act on some entries (limit 0.4)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()

    res = layer(x)
    expected, experts_TK, dropped_TK = blocks_layer_forward(reference, x_ref, c["k"])

    # Discrete decisions are exact: the same experts in the same (key) order, and the
    # same dropped copies as the brute-force capacity queue.
    assert res.routing.experts.tolist() == experts_TK
    if layer.capacity is None:
        assert res.routing.dropped is None
    else:
        assert res.routing.dropped is not None
        assert res.routing.dropped.tolist() == dropped_TK
    assert int(res.routing.num_dropped) == sum(map(sum, dropped_TK))
    assert res.out.shape == x.shape
    assert_close(res.out, expected, "output")

    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    res.out.backward(grad_out)
    if expected.requires_grad:
        expected.backward(grad_out)
    assert_close(grad_or_zero(x), grad_or_zero(x_ref), "grad x")
    for (name, p), p_ref in zip(layer.named_parameters(), reference.parameters(), strict=True):
        assert_close(grad_or_zero(p), grad_or_zero(p_ref), f"grad {name}")
    return layer


def grad_or_zero(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


# Every block, at least once, on top of the base case.
FEATURES = {
    "base": case(),
    "T0": case(shape=(0,)),
    "T0_sequences": case(shape=(2, 0), capacity=(1.0, None, "sequence")),
    "T1": case(shape=(1,), k=3),
    "E1": case(num_experts=1, k=1, shared=1),
    "k1_softmax": case(k=1),
    "sigmoid": case(scoring="sigmoid"),
    "sigmoid_k1_raw": case(scoring="sigmoid", k=1, renormalize="never"),
    "softmax_topk": case(scoring="softmax_topk", k=3, renormalize="never"),
    "group_limited": case(num_experts=8, k=3, selection=(4, 2, 2), scoring="sigmoid"),
    "group_limited_sum1": case(num_experts=9, k=2, selection=(3, 1, 1)),
    "renorm_always_k1": case(k=1, renormalize="always"),
    "renorm_always_eps": case(k=3, scoring="sigmoid", renormalize="always", eps=0.5),
    "renorm_never": case(k=3, renormalize="never"),
    "scale": case(renormalize="always", scale=2.5),
    "router_bias": case(router_bias=True, scoring="softmax_topk"),
    "selection_bias_sigmoid": case(selection_bias=True, scoring="sigmoid", k=3),
    "selection_bias_softmax_topk": case(selection_bias=True, scoring="softmax_topk"),
    "expert_bias": case(expert_bias=True),
    "clamped_swiglu": case(bank="clamped", expert_bias=True),
    "geglu": case(glu="gelu"),
    "mlp_gelu": case(bank="gelu", expert_bias=True),
    "mlp_gelu_tanh": case(bank="gelu_tanh"),
    "mlp_relu": case(bank="relu", expert_bias=True),
    "mlp_silu": case(bank="silu"),
    "init_std": case(init=(0.3, 0.5)),
    "init_default_scaled": case(init=(None, 2.0), bank="relu"),
    "shared_1": case(shared=1),
    "shared_1_gated": case(shared=1, shared_gate=True),
    "shared_2": case(shared=2, expert_bias=True),
    "shared_2_gated_mlp": case(shared=2, shared_gate=True, shared_bank="mlp"),
    "weight_inputs": case(weight_inputs=True, scoring="sigmoid", renormalize="never"),
    "weight_inputs_k1": case(weight_inputs=True, k=1, expert_bias=True, shared=1),
    "capacity_batch": case(capacity=(1.0, None, "batch"), skew=True),
    "capacity_sequence": case(capacity=(1.0, None, "sequence"), skew=True),
    "capacity_limit0": case(capacity=(None, 0, "batch"), shared=1),
    "capacity_limit1_sequence": case(capacity=(None, 1, "sequence"), k=3),
    "capacity_weight_inputs": case(
        capacity=(0.5, None, "batch"), weight_inputs=True, expert_bias=True
    ),
    "capacity_4d": case(shape=(2, 2, 5), capacity=(1.25, None, "sequence"), skew=True),
    "skew_empty_experts": case(num_experts=12, skew=True, expert_bias=True),
    "deepseek_like": case(
        num_experts=8,
        k=4,
        scoring="sigmoid",
        selection=(4, 2, 2),
        selection_bias=True,
        renormalize="always",
        scale=2.5,
        eps=1e-20,
        shared=2,
    ),
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_block_matches_reference(name: str) -> None:
    check_case(FEATURES[name])


def _divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


@st.composite
def cases(draw: st.DrawFn) -> dict:
    E = draw(st.integers(1, 10))
    selection = None
    max_k = E
    if draw(st.booleans()):
        G = draw(st.sampled_from(_divisors(E)))
        size = E // G
        selection = (G, draw(st.integers(1, G)), draw(st.integers(1, min(2, size))))
        max_k = selection[1] * size
    shape = draw(st.sampled_from([(0,), (1,), (7,), (2, 0), (1, 1), (2, 5), (3, 4), (2, 2, 3)]))
    capacity = None
    if draw(st.booleans()):
        limit = draw(st.sampled_from([None, 0, 1, 3]))
        factor = None if limit is not None else draw(st.sampled_from([0.5, 1.0, 1.5]))
        capacity = (factor, limit, draw(st.sampled_from(["batch", "sequence"])))
    bank = draw(st.sampled_from(["swiglu", "clamped", "gelu", "gelu_tanh", "relu", "silu"]))
    return case(
        shape=shape,
        dim=draw(st.integers(1, 7)),
        hidden=draw(st.integers(1, 6)),
        num_experts=E,
        k=draw(st.integers(1, min(max_k, 4))),
        scoring=draw(st.sampled_from(["softmax", "sigmoid", "softmax_topk"])),
        selection=selection,
        renormalize=draw(st.sampled_from(["always", "k>1", "never"])),
        scale=draw(st.sampled_from([1.0, 2.5])),
        eps=draw(st.sampled_from([0.0, 0.0, 0.3])),
        router_bias=draw(st.booleans()),
        selection_bias=draw(st.booleans()),
        bank=bank,
        glu=draw(st.sampled_from(["silu", "gelu"])),
        expert_bias=draw(st.booleans()),
        init=draw(st.sampled_from([None, (0.3, 1.0), (None, 0.5)])),
        shared=draw(st.integers(0, 2)),
        shared_gate=draw(st.booleans()),
        shared_bank=draw(st.sampled_from(["swiglu", "mlp"])),
        weight_inputs=draw(st.booleans()),
        capacity=capacity,
        skew=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=100)
@given(cases())
def test_drawn_compositions_match_reference(c: dict) -> None:
    check_case(c)


# ------------------------------------------------------------- single properties


def test_renormalize_always_k1_weight_is_exactly_one() -> None:
    for scoring in ("softmax", "sigmoid", "softmax_topk"):
        layer = build(case(k=1, renormalize="always", scoring=scoring, shape=(40,)))
        x = torch.randn(40, 6, dtype=torch.float64)
        routing = layer(x).routing
        # p / p is exactly 1 in IEEE arithmetic for any finite non-zero p.
        assert torch.equal(routing.weights, torch.ones_like(routing.weights)), scoring


def test_capacity_queue_order_rank_first_then_token() -> None:
    # Expert 0's queue: the first choices of tokens 0, 1, then the second choice of 2.
    experts_TK = torch.tensor([[0, 1], [0, 2], [1, 0]])
    routing = mb.Routing(
        torch.zeros(3, 3), torch.full((3, 3), 1 / 3), experts_TK, torch.full((3, 2), 0.5)
    )
    dropped = mb.Capacity(limit=1)(routing).dropped
    assert dropped is not None
    assert dropped.tolist() == [[False, True], [True, False], [False, True]]
    assert dropped.tolist() == capacity_dropped(experts_TK.tolist(), 3, 3, 1)
    # Per sequence (two sequences of length 2 with a leading batch of 2), every sequence
    # has its own queue.
    experts_TK = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    routing = mb.Routing(
        torch.zeros(4, 2),
        torch.full((4, 2), 0.5),
        experts_TK,
        torch.full((4, 2), 0.5),
        batch_shape=(2, 2),
    )
    capped = mb.Capacity(limit=1, per="sequence")(routing)
    assert capped.dropped is not None
    # Sequence 1: token 3's first choice (expert 1) queues before token 2's second
    # choice (also expert 1), so the second choices of both tokens are dropped.
    assert capped.dropped.tolist() == [[False, False], [True, True], [False, True], [False, True]]
    assert capped.dropped.tolist() == capacity_dropped(experts_TK.tolist(), 2, 2, 1)
    assert int(capped.num_dropped) == 4
    assert torch.equal(capped.weights, routing.weights.masked_fill(capped.dropped, 0.0))


def test_capacity_factor_sizes_the_queue() -> None:
    # C = ceil(factor · S · K / E): ceil(0.5 · 10 · 2 / 4) = 3 copies per expert.
    experts_TK = torch.tensor([[0, 1]] * 10)
    routing = mb.Routing(
        torch.zeros(10, 4), torch.full((10, 4), 0.25), experts_TK, torch.ones(10, 2)
    )
    dropped = mb.Capacity(factor=0.5)(routing).dropped
    assert dropped is not None
    assert dropped[:, 0].tolist() == [False] * 3 + [True] * 7
    assert dropped[:, 1].tolist() == [False] * 3 + [True] * 7
    assert mb.Capacity(factor=0.5).capacity(10, 2, 4) == 3
    assert mb.Capacity(factor=1.0).capacity(7, 1, 2) == 4


def test_dropped_copies_add_exactly_zero_and_get_zero_gradient() -> None:
    c = case(shape=(4, 6), num_experts=4, k=2, skew=True, expert_bias=True)
    layer = check_case({**c, "capacity": (None, 1, "sequence")})  # against the reference
    x = torch.randn(4, 6, 6, dtype=torch.float64, requires_grad=True)
    res = layer(x)
    dropped_TK = res.routing.dropped
    assert dropped_TK is not None
    assert torch.equal(res.routing.weights[dropped_TK], torch.zeros(int(dropped_TK.sum())))
    res.out.backward(torch.randn_like(x))
    # A token with every copy dropped gets exactly zero output and input gradient (the
    # residual connection around the layer carries it).
    all_dropped_T = dropped_TK.all(dim=1)
    assert bool(all_dropped_T.any()), "the skew should overflow expert 0"
    out_TD, grad_TD = res.out.reshape(-1, 6), x.grad.reshape(-1, 6)
    assert not out_TD[all_dropped_T].any()
    assert not grad_TD[all_dropped_T].any()
    # With room for no copy at all (an expert always keeps its first copy otherwise),
    # every expert parameter and the router get exactly zero gradient.
    layer = build({**c, "capacity": (None, 0, "batch")})
    x = torch.randn(4, 6, 6, dtype=torch.float64, requires_grad=True)
    res = layer(x)
    assert int(res.routing.num_dropped) == 4 * 6 * 2
    assert not res.out.any()
    res.out.backward(torch.randn_like(x))
    assert not x.grad.any()
    for name, p in layer.named_parameters():
        assert p.grad is None or not p.grad.any(), name


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
def test_s_shared_experts_equal_one_wide_expert(kind: str, gate: bool) -> None:
    torch.manual_seed(0)
    D, F, S = 5, 3, 2
    if kind == "swiglu":
        narrow: nn.Module = mb.SwiGLUExperts(S, D, F, bias=True)
        wide: nn.Module = mb.SwiGLUExperts(1, D, S * F, bias=True)
    else:
        narrow = mb.MLPExperts(S, D, F, activation="relu", bias=True)
        wide = mb.MLPExperts(1, D, S * F, activation="relu", bias=True)
    narrow_shared = mb.SharedExperts(narrow, gate=gate).double()
    wide_shared = mb.SharedExperts(wide, gate=gate).double()
    with torch.no_grad():
        for p in narrow.parameters():
            p.normal_()
        if gate:
            narrow_shared.gate_D.normal_()
            wide_shared.gate_D.copy_(narrow_shared.gate_D)
        # Hidden units of the S experts side by side; output biases add up.
        if kind == "swiglu":
            gate_w, up_w = narrow.w_in_EDF2.chunk(2, dim=-1)  # each [S, D, F]
            wide.w_in_EDF2[0] = torch.cat([*gate_w.unbind(0), *up_w.unbind(0)], dim=-1)
            gate_b, up_b = narrow.b_in_EF2.chunk(2, dim=-1)
            wide.b_in_EF2[0] = torch.cat([*gate_b.unbind(0), *up_b.unbind(0)])
        else:
            wide.w_in_EDF[0] = torch.cat(narrow.w_in_EDF.unbind(0), dim=-1)
            wide.b_in_EF[0] = torch.cat(narrow.b_in_EF.unbind(0))
        wide.w_out_EFD[0] = torch.cat(narrow.w_out_EFD.unbind(0), dim=0)
        wide.b_out_ED[0] = narrow.b_out_ED.sum(0)
    x = torch.randn(9, D, dtype=torch.float64)
    # Both sides are float64 and differ only in the order of the hidden-unit sums.
    torch.testing.assert_close(narrow_shared(x), wide_shared(x), rtol=1e-12, atol=1e-12)


def test_expert_init() -> None:
    torch.manual_seed(0)
    E, D, F = 4, 64, 48
    bank = mb.SwiGLUExperts(E, D, F, bias=True, init=mb.ExpertInit(std=0.02, out_scale=0.5))
    # 4·64·96 and 4·48·64 samples: the sample std is within 3 % of the true one with
    # overwhelming probability (relative standard error ~ 1/sqrt(2n) < 0.5 %).
    assert abs(bank.w_in_EDF2.std().item() / 0.02 - 1) < 0.03
    assert abs(bank.w_out_EFD.std().item() / 0.01 - 1) < 0.03
    assert abs(bank.w_in_EDF2.mean().item()) < 0.02 * 0.05
    assert not bank.b_in_EF2.any()
    assert not bank.b_out_ED.any()
    default = mb.MLPExperts(E, D, F, init=mb.ExpertInit(out_scale=0.25))
    # nn.Linear's default scale: uniform in ±1/sqrt(fan_in), out_scale on the output only.
    bound_in, bound_out = 1 / math.sqrt(D), 0.25 / math.sqrt(F)
    assert default.w_in_EDF.abs().max().item() <= bound_in
    assert default.w_in_EDF.abs().max().item() > 0.95 * bound_in
    assert default.w_out_EFD.abs().max().item() <= bound_out
    assert default.w_out_EFD.abs().max().item() > 0.95 * bound_out
    assert mb.MLPExperts(E, D, F).init == mb.ExpertInit()


def test_selection_bias_changes_choice_not_weights() -> None:
    c = case(scoring="sigmoid", selection_bias=True, renormalize="always", k=2, shape=(50,))
    layer = build(c)
    with torch.no_grad():
        layer.router.balancer.bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, 0]))
    x = torch.randn(50, 6, dtype=torch.float64)
    routing = layer(x).routing
    assert bool((routing.experts[:, 0] == 0).all())  # the bias forces expert 0 first
    gates_TK = routing.probs.gather(1, routing.experts)
    torch.testing.assert_close(
        routing.weights, gates_TK / gates_TK.sum(-1, keepdim=True), rtol=0, atol=0
    )


def test_scorer_compute_dtype_and_routing_dtype() -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 6, dtype=torch.float64)
    scorer = mb.LinearScorer(6, 4, bias=True, compute_dtype="float32").double()
    with torch.no_grad():
        scorer.bias_E.normal_()
    # "float32" casts tokens and weights first (DeepSeek-V3's gate): bitwise the float32
    # matmul, returned in float32 even for float64 tokens.
    expected = torch.nn.functional.linear(
        x.float(), scorer.weight_ED.float(), scorer.bias_E.float()
    )
    assert torch.equal(scorer(x), expected)
    # routing_dtype pins the dtype the scoring function runs in.
    router = mb.Router(mb.LinearScorer(6, 4).double(), 2, routing_dtype=torch.float32)
    routing = router(x)
    assert routing.scores.dtype == routing.probs.dtype == routing.weights.dtype == torch.float32
    assert mb.Router(mb.LinearScorer(6, 4).double(), 2)(x).probs.dtype == torch.float64


# ------------------------------------------------------------------------- errors


def _router(**kwargs: object) -> mb.Router:
    return mb.Router(mb.LinearScorer(4, 8), kwargs.pop("k", 2), **kwargs)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: mb.GroupLimitedTopK(0, 1), ValueError, "num_groups must be an int >= 1"),
        (lambda: mb.GroupLimitedTopK(True, 1), ValueError, "num_groups must be an int >= 1"),
        (lambda: mb.GroupLimitedTopK(2, 0), ValueError, "groups_per_token must be an int"),
        (lambda: mb.GroupLimitedTopK(2, 1, 0), ValueError, "group_score_k must be an int"),
        (lambda: mb.GroupLimitedTopK(2, 3), ValueError, r"groups_per_token \(3\) must be <="),
        (lambda: _router(selection=mb.GroupLimitedTopK(3, 1)), ValueError, "must divide"),
        (
            lambda: _router(selection=mb.GroupLimitedTopK(8, 1, 2)),
            ValueError,
            r"group_score_k \(2\) exceeds the group size \(1\)",
        ),
        (
            lambda: _router(k=5, selection=mb.GroupLimitedTopK(4, 2)),
            ValueError,
            "k reaches 5 but 2 groups of 2 experts hold only 4",
        ),
        (lambda: mb.WeightPolicy("sometimes"), ValueError, "renormalize must be one of"),
        (lambda: mb.WeightPolicy(scale=0.0), ValueError, "scale must be a finite number > 0"),
        (lambda: mb.WeightPolicy(scale=math.inf), ValueError, "scale must be"),
        (lambda: mb.WeightPolicy(eps=-1e-3), ValueError, "eps must be a finite number >= 0"),
        (lambda: _router(scoring="tanh"), ValueError, "scoring must be one of"),
        (lambda: _router(selection="topk"), TypeError, "selection"),
        (lambda: _router(weights="always"), TypeError, "weights"),
        (lambda: _router(balancer=mb.BiasBalancer(4)), ValueError, "balancer has 4 experts"),
        (lambda: _router(balancer=nn.Linear(2, 2)), TypeError, "balancer"),
        (lambda: _router(jitter=1.0), ValueError, r"jitter must be a number in \[0, 1\)"),
        (lambda: _router(routing_dtype=torch.float16), ValueError, "routing_dtype must be"),
        (lambda: mb.LinearScorer(4, 8, compute_dtype="bf16"), ValueError, "compute_dtype"),
        (lambda: mb.LinearScorer(4, 0), ValueError, "num_experts must be an int >= 1"),
        (lambda: mb.Capacity(), ValueError, "exactly one of factor and limit"),
        (lambda: mb.Capacity(factor=1.0, limit=2), ValueError, "exactly one of factor"),
        (lambda: mb.Capacity(factor=0.0), ValueError, "factor must be a finite number > 0"),
        (lambda: mb.Capacity(factor=math.nan), ValueError, "factor must be"),
        (lambda: mb.Capacity(limit=-1), ValueError, "limit must be an int >= 0"),
        (lambda: mb.Capacity(limit=True), ValueError, "limit must be an int >= 0"),
        (lambda: mb.Capacity(limit=1, per="token"), ValueError, "per must be 'batch' or"),
        (lambda: mb.SharedExperts(nn.Linear(4, 4)), TypeError, "experts"),
        (lambda: mb.GLU("tanh"), ValueError, "activation must be one of"),
        (lambda: mb.ClampedSwiGLU(limit=0.0), ValueError, "limit > 0"),
        (lambda: mb.ClampedSwiGLU(alpha=math.nan), ValueError, "need finite alpha"),
        (lambda: mb.SwiGLUExperts(2, 4, 3, activation="silu"), TypeError, "activation"),
        (lambda: mb.MLPExperts(2, 4, 3, activation="swish"), ValueError, "activation must be"),
        (lambda: mb.GELUExperts(2, 4, 3, activation="relu"), ValueError, "GELUExperts takes"),
        (lambda: mb.MLPExperts(2, 4, 0), ValueError, "hidden must be an int >= 1"),
        (lambda: mb.MLPExperts(2, 4, 3, init=0.02), TypeError, "init"),
        (lambda: mb.ExpertInit(std=0.0), ValueError, "std must be None or a finite number"),
        (lambda: mb.ExpertInit(out_scale=-1.0), ValueError, "out_scale must be a finite"),
    ],
)
# A TypeError comes from the constructor or, first, from the test run's beartype hook
# (see conftest.py); either message names the argument, which is what is matched.
def test_constructors_reject_bad_input(make, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_layer_rejects_bad_shared_and_capacity() -> None:
    router = _router()
    experts = mb.SwiGLUExperts(8, 4, 3)
    with pytest.raises(TypeError, match="shared"):
        mb.MoELayer(router, mb.TorchDispatcher(), experts, shared=mb.SwiGLUExperts(1, 4, 3))
    wrong_dim = mb.SharedExperts(mb.SwiGLUExperts(1, 5, 3))
    with pytest.raises(ValueError, match="shared experts have dim 5, the router 4"):
        mb.MoELayer(router, mb.TorchDispatcher(), experts, shared=wrong_dim)
    with pytest.raises(TypeError, match="capacity"):
        mb.MoELayer(router, mb.TorchDispatcher(), experts, capacity=1.25)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 8\]"):
        router(torch.randn(3, 4), k=9)
    group_router = _router(k=2, selection=mb.GroupLimitedTopK(4, 1))
    with pytest.raises(ValueError, match="k reaches 3 but 1 groups of 2 experts hold only 2"):
        group_router(torch.randn(3, 4), k=3)


def test_routing_record_fields() -> None:
    layer = build(case(shape=(2, 3, 4), capacity=(None, 1, "sequence")))
    res = layer(torch.randn(2, 3, 4, 6, dtype=torch.float64))
    assert res.routing.batch_shape == (2, 3, 4)
    assert res.routing.sequences() == (6, 4)
    no_cap = dataclasses.replace(res.routing, dropped=None, batch_shape=None)
    assert no_cap.sequences() == (1, 24)
    assert int(no_cap.num_dropped) == 0
