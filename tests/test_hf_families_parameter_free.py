"""LongCat-Flash: FFN experts beside parameter-free (identity) experts, against HF's block.

LongCat-Flash's router scores E FFN experts and Z "zero-computation" experts; a token
routed to one of the Z gets ``weight · x`` from it. moeblocks composes that as
``ConcatExperts(SwiGLUExperts(E, D, F), IdentityExperts(Z, D))``: the routing record
names the identity experts by their ids E … E+Z−1. Its router keeps the weight in an
``nn.Linear`` ``classifier``, which the shared ``Spec`` machinery of
``test_hf_families.py`` cannot skew, so the family is tested here with its helpers.

HF sums a token's identity weights in float32 before multiplying the input, so a float64
block whose token picks two identity experts differs from moeblocks (which sums each slot
in the model dtype) by a float32 rounding: the main fixture has Z = 1, exact in every
dtype, and one more test bounds Z = 4 at float32 precision.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import hf_errors
import pytest
import torch
import transformers
from hf_round_trip import assert_round_trip_bitwise
from test_hf_families import TINY, D, E, F, _compare, _rel, _route
from torch import Tensor, nn

from moeblocks.experts import ConcatExperts, IdentityExperts
from moeblocks.hf import from_hf, to_hf

NAME = "longcat_flash"
LONGCAT = {
    "hidden_size": D,
    "expert_ffn_hidden_size": F,
    "n_routed_experts": E,
    "zero_expert_num": 1,
    "moe_topk": 3,
    "routed_scaling_factor": 2.5,
    "num_attention_heads": 2,
}


@functools.cache
def _block(zero_experts: int = 1) -> nn.Module:
    """The tiny block: N(0, 0.5²) weights, N(0, 0.1²) selection bias, eval."""
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE

    config = transformers.LongcatFlashConfig(**{**LONGCAT, "zero_expert_num": zero_experts})
    block = LongcatFlashMoE(config)
    g = torch.Generator().manual_seed(len(NAME))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for b in block.buffers():  # the selection bias: zeros would hide a missed buffer
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return block.eval()


def _fresh(dtype: torch.dtype, zero_experts: int = 1) -> nn.Module:
    return copy.deepcopy(_block(zero_experts)).to(dtype)


def _inputs(block: nn.Module, dtype: torch.dtype, skew: bool) -> Tensor:
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if skew:  # along one router row: most tokens pick the same experts, others get none
        w = block.router.classifier.weight[3].detach().to(dtype)
        x = 0.1 * x + 4 * w / w.norm()
    return x


@pytest.fixture(scope="module", autouse=True)
def _write_errors() -> Iterator[None]:
    yield
    hf_errors.write()


def test_the_layer_names_the_identity_experts() -> None:
    layer = from_hf(_block())
    assert isinstance(layer.experts, ConcatExperts)
    assert isinstance(layer.experts.banks[1], IdentityExperts)
    assert layer.num_experts == E + 1
    routing = layer(_inputs(_block(), torch.float32, skew=False)).routing
    assert (routing.experts == E).any(), "some token should pick the identity expert"


@pytest.mark.parametrize(
    ("skew", "dtype"),
    [(False, torch.float32), (False, torch.float64), (True, torch.float64)],
    ids=["plain-fp32", "plain-fp64", "skewed-fp64"],
)
def test_family_matches_hf_in_eval_mode(skew: bool, dtype: torch.dtype) -> None:
    block = _fresh(dtype)
    layer = from_hf(block)
    x = _inputs(block, dtype, skew)
    _compare(NAME, block, layer, x)

    logits, experts = _route(block, x.reshape(-1, D))
    routing = layer(x).routing
    # The same float32 F.linear on both sides, over the FFN and the identity experts.
    torch.testing.assert_close(routing.scores, logits, rtol=0, atol=0)
    assert torch.equal(routing.experts.sort(-1).values, experts.sort(-1).values)
    if skew:
        counts = torch.bincount(routing.experts.reshape(-1), minlength=E + 1)
        assert (counts == 0).any(), "the skewed input should leave an expert without token"


def test_family_matches_hf_in_training_mode() -> None:
    # No jitter or dropout in this block: HF's training mode is deterministic.
    block = _fresh(torch.float64).train()
    layer = from_hf(block)
    assert layer.training
    _compare(NAME, block, layer, _inputs(block, torch.float64, skew=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_several_identity_experts(dtype: torch.dtype) -> None:
    block = _fresh(dtype, zero_experts=4)
    layer = from_hf(block)
    x = _inputs(block, dtype, skew=False)
    res = layer(x)
    picks = (res.routing.experts >= E).sum(-1)
    assert (picks >= 2).any(), "some token should pick two identity experts"
    with torch.no_grad():
        err = _rel(res.out, block(x))
    # float32: the bound. float64: HF sums a token's identity weights in float32
    # (one rounding, 2^-24 ≈ 6e-8 relative), moeblocks in the model dtype.
    assert err <= 1e-5 if dtype == torch.float32 else 1e-12 < err <= 1e-6


def test_family_round_trip_is_bitwise() -> None:
    block = _block()
    assert_round_trip_bitwise(NAME, block, copy.deepcopy(block))


def test_to_hf_refuses_a_bank_without_the_identity_experts() -> None:
    block = copy.deepcopy(_block())
    layer = from_hf(block)
    layer.experts = layer.experts.banks[0]
    with pytest.raises(TypeError, match="IdentityExperts"):
        to_hf(layer, block)


def test_swap_and_capture_a_whole_model() -> None:
    from moeblocks.hf import capture_routing, swap_moe_blocks, unswap_moe_blocks

    kwargs = {**LONGCAT, **TINY, "num_key_value_heads": 2, "zero_expert_num": 2}
    kwargs["n_routed_experts"] = 4
    torch.manual_seed(0)
    model = transformers.LongcatFlashForCausalLM(transformers.LongcatFlashConfig(**kwargs))
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids, output_router_logits=True)
        swapped = swap_moe_blocks(model)
        assert swapped >= 1
        after = model(ids, output_router_logits=True)
        with capture_routing(model) as rec:
            model(ids)
    # The same block, summed in another order: float32 rounding only.
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-6)
    for a, b in zip(after.router_logits, before.router_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # FFN and identity experts
    assert [len(r) for r in rec.routings.values()] == [1] * swapped
    unswap_moe_blocks(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
