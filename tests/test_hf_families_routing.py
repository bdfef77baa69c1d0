"""Family rows whose HF blocks the ``Spec`` form of ``test_hf_families.py`` cannot drive.

DBRX's router returns bare logits under ``router.layer`` (no ``(logits, weights,
experts)`` tuple, no ``weight`` on the router). Doge's block holds its experts and
dense MLP itself, scores product keys paired across the batch and returns its key
logits. PhiMoE's SparseMixer samples in training
mode: HF's block and the layer run under the same torch seed, and moeblocks'
:class:`~moeblocks.gating.SparseMixer` draws the same numbers in the same order, so
training mode is compared exactly too. Each family here gets the same checks as
there, with its own way to read HF's routing: outputs, router logits, chosen experts,
the input gradient and every weight gradient in fp32 and fp64, eval and training mode,
plain and skewed routing (experts with no token), ``to_hf(from_hf(b))`` bit for bit.
Weights are N(0, 0.5²), buffers N(0, 0.1²) (zeros would hide a missed buffer).
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import hf_errors
import pytest
import torch
import transformers
from hf_round_trip import assert_round_trip_bitwise
from test_hf_families import TOL, _compare, _rel
from torch import Tensor, nn

from moeblocks.hf import FAMILIES, from_hf

D, F, E = 16, 8, 8
ROWS = {f.name: f for f in FAMILIES}


@dataclass(frozen=True)
class Case:
    folder: str  # transformers.models.<folder>.modeling_<folder>
    config: Callable[[], object]  # the tiny config
    route: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]  # HF's (logits, experts)
    router_weight: Callable[[nn.Module], Tensor]  # the [E, D] router weight (for skew)
    seeded: bool = False  # training mode draws random numbers: seed both forwards alike


def _dbrx_route(block: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    logits = block.router(tokens)
    return logits, block.route_tokens_to_experts(logits)[1]


def _phimoe_route(block: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    logits, _, experts = block.router(tokens)
    return logits, experts


def _doge_route(block: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    # HF's own steps: key logits viewed [2, T, n] across the batch, all n² sums, top-k.
    T, n = tokens.shape[0], block.num_keys
    keys = block.router_gate(tokens[None]).view(2, T, -1)
    (a, b), (ia, ib) = keys.topk(n, dim=-1)
    sums = (a.unsqueeze(-1) + b.unsqueeze(-2)).view(T, -1)
    ids = (ia.unsqueeze(-1) * n + ib.unsqueeze(-2)).view(T, -1)
    experts = ids.gather(-1, sums.topk(block.top_k, dim=-1).indices)
    return torch.empty_like(sums).scatter_(1, ids, sums), experts


CASES = {
    "dbrx": Case(
        "dbrx",
        lambda: transformers.DbrxConfig(
            d_model=D,
            n_heads=2,
            ffn_config={
                "ffn_hidden_size": F,
                "moe_num_experts": E,
                "moe_top_k": 2,
                # The released DBRX uses 1 (the sum); 2 checks that p reaches the policy.
                "moe_normalize_expert_weights": 2.0,
            },
        ),
        _dbrx_route,
        lambda block: block.router.layer.weight,
    ),
    "phimoe": Case(
        "phimoe",
        lambda: transformers.PhimoeConfig(
            hidden_size=D,
            intermediate_size=F,
            num_local_experts=E,
            num_attention_heads=2,
            num_key_value_heads=1,
            # A candidate margin of 60 % (2 · 0.3; the released model uses 2 %) keeps a
            # few experts in each slot's softmax, so the gates are not all 1.
            router_jitter_noise=0.3,
        ),
        _phimoe_route,
        lambda block: block.router.weight,
        seeded=True,
    ),
    "doge": Case(
        "doge",
        lambda: transformers.DogeConfig(
            hidden_size=D,
            intermediate_size=F,
            num_attention_heads=2,
            num_key_value_heads=1,
            is_moe=True,
            num_experts=16,  # 4 keys per half
            num_experts_per_tok=4,
            # True makes HF's block divide its softmax output in place, which breaks
            # its own backward pass (transformers 5.25); False is the released default.
            norm_topk_prob=False,
        ),
        _doge_route,
        lambda block: block.router_gate.weight,
    ),
}
NAMES = sorted(CASES)


@functools.cache
def _block(name: str) -> nn.Module:
    case = CASES[name]
    module = importlib.import_module(f"transformers.models.{case.folder}.modeling_{case.folder}")
    block = getattr(module, ROWS[name].block_class)(case.config())
    g = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for b in block.buffers():
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return block.eval()


def _fresh(name: str, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(_block(name)).to(dtype)


def _inputs(name: str, block: nn.Module, dtype: torch.dtype, skew: bool) -> Tensor:
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if skew:
        # Along one router row, most tokens pick the same experts: others get no token.
        w = CASES[name].router_weight(block)[3].detach().to(dtype)
        x = 0.1 * x + 4 * w / w.norm()
    return x


@pytest.fixture(scope="module", autouse=True)
def _write_errors() -> Iterator[None]:
    yield
    hf_errors.write()


@pytest.mark.parametrize(
    ("skew", "dtype"),
    [(False, torch.float32), (False, torch.float64), (True, torch.float64)],
    ids=["plain-fp32", "plain-fp64", "skewed-fp64"],
)
@pytest.mark.parametrize("name", NAMES)
def test_family_matches_hf_in_eval_mode(name: str, skew: bool, dtype: torch.dtype) -> None:
    block = _fresh(name, dtype)
    layer = from_hf(block)
    x = _inputs(name, block, dtype, skew)
    _compare(name, block, layer, x)

    with torch.no_grad():
        logits, experts = CASES[name].route(block, x.reshape(-1, D).clone())
        routing = layer(x).routing
    # The same F.linear, compared in the routing dtype.
    torch.testing.assert_close(routing.scores, logits.to(routing.scores.dtype), rtol=0, atol=0)
    assert torch.equal(routing.experts.sort(-1).values, experts.sort(-1).values)
    if skew:
        counts = torch.bincount(routing.experts.reshape(-1), minlength=E)
        assert (counts == 0).any(), "the skewed input should leave an expert without token"


def _seed(*_: object) -> None:
    torch.manual_seed(7)  # returns None: a pre-hook's result would replace the input


def _seed_each_forward(module: nn.Module) -> None:
    module.register_forward_pre_hook(_seed)


@pytest.mark.parametrize("name", NAMES)
def test_family_matches_hf_in_training_mode(name: str) -> None:
    # No input jitter in these configs; SparseMixer's draws are seeded alike on both sides.
    block = _fresh(name, torch.float64).train()
    layer = from_hf(block)
    assert layer.training
    if CASES[name].seeded:
        _seed_each_forward(block)
        _seed_each_forward(layer)
    x = _inputs(name, block, torch.float64, skew=False)
    err = _compare(name, block, layer, x)
    assert err <= TOL[torch.float64]
    if CASES[name].seeded:  # the sampling ran: training chose other experts than eval
        with torch.no_grad():
            trained = layer(x).routing.experts
            assert not torch.equal(trained, layer.eval()(x).routing.experts)


@pytest.mark.parametrize("name", NAMES)
def test_family_round_trip_is_bitwise(name: str) -> None:
    block = _block(name)
    assert_round_trip_bitwise(name, block, _fresh(name, torch.float32))


def test_ernie_vl_modality_split_keeps_its_outputs_when_swapped() -> None:
    # HF's Ernie4_5_VLMoeMoeBlock sends text tokens to one converted block and vision
    # tokens to the other, flattened to 1-D; the swapped adapters must take and return that.
    from moeblocks.hf import capture_routing, swap_moe_blocks, unswap_moe_blocks

    module = importlib.import_module("transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe")
    config = transformers.Ernie4_5_VLMoeTextConfig(
        hidden_size=D,
        moe_intermediate_size=[F, 2 * F],
        moe_num_experts=E,
        moe_k=2,
        moe_num_shared_experts=1,
    )
    outer = module.Ernie4_5_VLMoeMoeBlock(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in outer.parameters():  # selection biases included (frozen parameters)
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    outer.eval()
    state = {k: v.clone() for k, v in outer.state_dict().items()}
    x = torch.randn(2, 5, D, generator=g)
    types = torch.tensor([[0, 0, 1, 1, 0], [2, 0, 0, 1, 0]])
    with torch.no_grad():
        with capture_routing(outer) as rec_hf:
            before = [outer(x, types), outer(x)]  # mixed modalities, then text only
        assert swap_moe_blocks(outer) == 2
        with capture_routing(outer) as rec_mb:
            after = [outer(x, types), outer(x)]
    # Text tokens, then vision tokens, then all tokens (text only) through text_moe.
    assert [len(r) for r in rec_hf.routings.values()] == [2, 1]
    for name, records in rec_hf.routings.items():
        for hf, mb in zip(records, rec_mb.routings[name], strict=True):
            assert hf.batch_shape == mb.batch_shape
            assert torch.equal(hf.experts, mb.experts)
    for (out_a, logits_a), (out_b, logits_b) in zip(after, before, strict=True):
        # The same blocks, the K expert outputs summed in another order: float32
        # rounding, measured as the family tests do (relative to the output's norm).
        assert _rel(out_a, out_b) <= TOL[torch.float32]
        torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0)  # the same F.linear
    assert (before[0][1] != before[1][1]).any(), "vision tokens should use the vision router"
    unswap_moe_blocks(outer)
    for key, value in outer.state_dict().items():
        assert torch.equal(value, state[key]), key
