"""Families whose router takes more than the hidden states, against their HF blocks.

DeepSeek-V4's first MoE layers route by token id (``DeepseekV4HashRouter``: a fixed
``tid2eid`` table; the decoder passes ``input_ids`` to the block), which moeblocks
expresses as a :class:`~moeblocks.HashSelection` fed by ``MoELayer(x, token_ids=...)``.
Dots3-Note's vision MoE hands its router the block's selection bias. The ``Spec``
machinery of ``test_hf_families.py`` calls ``block(x)`` and ``router(tokens)``, so these
blocks are compared here, with its helpers: outputs, the chosen experts, the input
gradient and every weight gradient (mapped back with ``to_hf``), fp32 and fp64, eval and
training mode, plain and skewed routing (experts with no token), random non-zero tables
and biases, and bit-for-bit round trips. DeepSeek-V4's top-k layers are a ``Spec`` there.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator

import hf_errors
import pytest
import torch
import transformers
from hf_round_trip import assert_round_trip_bitwise
from test_hf_families import HEADS, TINY, TOL, D, E, F, _grads_as_hf, _rel
from torch import Tensor, nn

from moeblocks import HashSelection
from moeblocks.hf import HFMoEBlock, family_of, from_hf
from moeblocks.hf.families import FAMILIES
from moeblocks.layer import MoELayer
from moeblocks.routing import MoEOutput

V, K = 64, 3  # vocabulary of the hash table, experts per token
V4 = {
    **HEADS,
    "hidden_size": D,
    "intermediate_size": F,
    "num_local_experts": E,
    "num_experts_per_tok": K,
    "routed_scaling_factor": 2.5,
    # A limit the N(0, 0.5²) weights cross often, so the clamps are exercised both ways.
    "swiglu_limit": 1.0,
    "vocab_size": V,
    "num_hidden_layers": 2,
    "mlp_layer_types": ["hash_moe", "moe"],
}


def _randomise(block: nn.Module, seed: int) -> nn.Module:
    """N(0, 0.5²) weights, N(0, 0.1²) float buffers: zeros would hide a missed tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for b in block.buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return block.eval()


@functools.cache
def _hash_block() -> nn.Module:
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m

    block = _randomise(m.DeepseekV4SparseMoeBlock(transformers.DeepseekV4Config(**V4), 0), 4)
    assert block.is_hash
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # K distinct experts per token id, none of them fixed
        block.gate.tid2eid.copy_(torch.rand(V, E, generator=g).argsort(-1)[:, :K])
    return block


@functools.cache
def _vision_block() -> nn.Module:
    from transformers.models.dots3_note import modeling_dots3_note as m

    config = transformers.Dots3NoteVisionConfig(
        hidden_size=D,
        num_attention_heads=2,
        moe_intermediate_size=F,
        adapter_in_dim=D,
        num_experts_per_tok=K,
        router_scaling_factor=2.5,
        pyramid_num_routed=[E, -1],  # layer 0: a sparse MoE of E experts
    )
    return _randomise(m.Dots3NoteVisionMoE(config, 0), 6)


BLOCKS: dict[str, Callable[[], nn.Module]] = {
    "deepseek_v4": _hash_block,
    "dots3_note_vision": _vision_block,
}


def _ids(skew: bool) -> Tensor:
    g = torch.Generator().manual_seed(7)
    if skew:  # three token ids in all: at most 3 · K of the E experts get a token
        return torch.tensor([3, 9, 3, 27, 9, 3, 27, 3, 9, 3]).view(2, 5)
    return torch.randint(0, V, (2, 5), generator=g)


def _inputs(block: nn.Module, dtype: torch.dtype, skew: bool) -> Tensor:
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if skew:  # along one router row, most tokens pick the same experts
        w = block.gate.weight[3].detach().to(dtype)
        x = 0.1 * x + 4 * w / w.norm()
    return x


def _hf_route(name: str, block: nn.Module, x: Tensor, ids: Tensor) -> Tensor:
    """The experts HF's router chooses, [T, K]."""
    if name == "deepseek_v4":
        return block.gate(x, ids)[2]
    return block.gate(x, block.e_score_correction_bias)[2]


def _hf(name: str, block: nn.Module, x: Tensor, ids: Tensor) -> Tensor:
    return block(x, input_ids=ids) if name == "deepseek_v4" else block(x)


def _mb(name: str, layer: MoELayer, x: Tensor, ids: Tensor) -> MoEOutput:
    return layer(x, token_ids=ids) if name == "deepseek_v4" else layer(x)


def _compare(name: str, block: nn.Module, layer: MoELayer, x: Tensor, ids: Tensor) -> None:
    """Outputs, input and weight gradients agree; the largest error is recorded."""
    x_hf, x_mb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, res = _hf(name, block, x_hf, ids), _mb(name, layer, x_mb, ids)
    assert res.out.dtype == x.dtype
    errs = [_rel(res.out, ref)]
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    (ref * g).sum().backward()
    (res.out * g).sum().backward()
    errs.append(_rel(x_mb.grad, x_hf.grad))
    for pname, expected, got in _grads_as_hf(layer, block):
        # Experts that got no token have zero gradient on both sides: floor the norm at 1.
        errs.append(_rel(got, expected, floor=1.0))
        assert errs[-1] <= TOL[x.dtype], f"{name}: gradient of {pname} differs by {errs[-1]:.3g}"
    assert max(errs[:2]) <= TOL[x.dtype], f"{name}: output/input-gradient errors {errs[:2]}"
    hf_errors.record(name, x.dtype, max(errs))


@pytest.fixture(scope="module", autouse=True)
def _write_errors() -> Iterator[None]:
    yield
    hf_errors.write()


@pytest.mark.parametrize(
    ("skew", "dtype"),
    [(False, torch.float32), (False, torch.float64), (True, torch.float64)],
    ids=["plain-fp32", "plain-fp64", "skewed-fp64"],
)
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_matches_hf_in_eval_mode(name: str, skew: bool, dtype: torch.dtype) -> None:
    block = copy.deepcopy(BLOCKS[name]()).to(dtype)
    layer = from_hf(block)
    x, ids = _inputs(block, dtype, skew), _ids(skew)
    _compare(name, block, layer, x, ids)
    tokens = x.reshape(-1, D)
    routing = _mb(name, layer, x, ids).routing
    expected = _hf_route(name, block, tokens, ids)
    assert torch.equal(routing.experts.sort(-1).values, expected.sort(-1).values)
    if skew:
        counts = torch.bincount(routing.experts.reshape(-1), minlength=E)
        assert (counts == 0).any(), "the skewed input should leave an expert without token"


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_matches_hf_in_training_mode(name: str) -> None:
    # No jitter or dropout in these blocks: HF's training mode is deterministic.
    block = copy.deepcopy(BLOCKS[name]()).to(torch.float64).train()
    layer = from_hf(block)
    assert layer.training
    _compare(name, block, layer, _inputs(block, torch.float64, False), _ids(False))


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_round_trip_is_bitwise(name: str) -> None:
    block = BLOCKS[name]()
    assert_round_trip_bitwise(name, block, copy.deepcopy(block))


def test_the_hash_layer_is_a_hash_selection_and_needs_the_ids() -> None:
    layer = from_hf(_hash_block())
    assert isinstance(layer.router.selection, HashSelection)
    torch.testing.assert_close(layer.router.selection.table_VK, _hash_block().gate.tid2eid)
    with pytest.raises(ValueError, match="routes by token id: pass token_ids"):
        layer(torch.randn(2, 5, D))


def test_the_swap_adapter_passes_input_ids() -> None:
    # DeepSeek-V4's decoder calls its MoE block as mlp(x, input_ids=ids).
    block = _hash_block()
    family = family_of(block)
    adapter = HFMoEBlock(from_hf(block), family, type(block.gate))
    x, ids = _inputs(block, torch.float32, False), _ids(False)
    with torch.no_grad():
        # Summed in another order: float32 rounding only.
        torch.testing.assert_close(
            adapter(x, input_ids=ids), block(x, input_ids=ids), rtol=1e-5, atol=1e-6
        )


def test_capture_routing_of_an_unswapped_hash_layer_reads_the_ids() -> None:
    from moeblocks.hf import capture_routing

    model = nn.ModuleDict({"mlp": _hash_block()})
    x, ids = _inputs(model["mlp"], torch.float32, False), _ids(False)
    with torch.no_grad(), capture_routing(model) as rec:
        model["mlp"](x, input_ids=ids)
    (routing,) = rec.routings["mlp"]
    assert torch.equal(routing.experts, model["mlp"].gate.tid2eid[ids.reshape(-1)])


def test_swap_and_capture_a_whole_deepseek_v4() -> None:
    # Its decoder hands input_ids to every MoE block: the swapped hash layer must get them.
    from moeblocks.hf import capture_routing, swap_moe_blocks, unswap_moe_blocks

    torch.manual_seed(0)
    small = {"head_dim": 16, "q_lora_rank": 16, "o_lora_rank": 16, "index_head_dim": 8}
    config = transformers.DeepseekV4Config(
        **TINY, **small, intermediate_size=F, num_local_experts=4, num_experts_per_tok=2
    )
    config.mlp_layer_types = ["hash_moe", "moe"]
    model = transformers.DeepseekV4ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():  # zeros (HF's init of both buffers) would hide a missed one
        model.model.layers[0].mlp.gate.tid2eid.copy_(
            torch.rand(TINY["vocab_size"], 4, generator=g).argsort(-1)[:, :2]
        )
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.1, generator=g)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, TINY["vocab_size"], (2, 7), generator=g)
    with torch.no_grad():
        before = model(ids, output_router_logits=True)
        assert swap_moe_blocks(model) == 2
        after = model(ids, output_router_logits=True)
        with capture_routing(model) as rec:
            model(ids)
    # The same blocks, summed in another order: float32 rounding only.
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-6)
    # HF records the top-k layer's logits only (its recorder matches DeepseekV4TopKRouter).
    assert len(after.router_logits) == len(before.router_logits) == 1
    torch.testing.assert_close(after.router_logits[0], before.router_logits[0])
    torch.testing.assert_close(after.aux_loss, before.aux_loss, rtol=1e-5, atol=1e-6)
    hashed = rec.routings["model.layers.0.mlp"][0]
    assert torch.equal(hashed.experts, state["model.layers.0.mlp.gate.tid2eid"][ids.reshape(-1)])
    unswap_moe_blocks(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_every_row_here_is_a_family() -> None:
    assert set(BLOCKS) <= {f.name for f in FAMILIES}
