"""Families whose HF block computes parts in float32 in any model dtype, against HF.

Inkling2 (and its looped twin) keep the router weight and selection bias in float32
(``_keep_in_fp32_modules_strict``: a float64 router weight makes HF's router fail, as it
casts its input to float32), run the soft-capped SwiGLU in float32, and their eager
experts sum the weighted outputs in a float32 accumulator. Inkling routes in float32
(the weights by ``exp(logσ − logsumexp logσ)``) and sums its shared experts in float32.
The shared ``Spec`` form of ``test_hf_families.py`` casts the whole block and reads a
3-tuple from the router, so these blocks are tested here: Inkling2's experts in the
model dtype with the router as HF loads it; Inkling's whole block cast.

In a float64 block those float32 casts round the routing weights, activations and
outputs to float32 precision, and a last-bit difference of a float64 value before a cast
can flip a float32 rounding (gradients then differ by ~1e-9). So the float64 comparisons
check the structure at float64 precision with the casts removed on both sides. Inkling2:
HF's activation runs its own soft caps without ``.float()``, HF's experts run its
``batched_mm`` path (the same block, summed in the model dtype), and the layer's
activation gets ``dtype=None``. Inkling: HF's block runs with ``Tensor.float`` as the
identity, and the layer's router scores and routes in the model dtype. float32, where the
casts do nothing, compares the layers exactly as converted; one test per family bounds
the difference to HF's untouched float64 block at float32 precision.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
from collections.abc import Iterator
from unittest import mock

import hf_errors
import pytest
import torch
import transformers
from hf_round_trip import assert_round_trip_bitwise
from test_hf_families import TINY, D, E, F, _compare, _inputs, _rel, _route
from torch import Tensor, nn

from moeblocks.gating import AlwaysOnTopK
from moeblocks.hf import FAMILIES, from_hf
from moeblocks.layer import MoELayer

# Caps the N(0, 0.5²) weights cross often (gate and up have std ≈ 2), so both soft caps bend.
INKLING2 = {
    "hidden_size": D,
    "moe_intermediate_size": F,
    "n_routed_experts": E,
    "num_experts_per_tok": 3,
    "route_scale": 2.5,
    "mlp_gate_softcap": 1.0,
    "mlp_up_softcap": 1.5,
}
S = 2  # Inkling's shared experts, weighted by the router with the routed ones
INKLING = {
    "hidden_size": D,
    "moe_intermediate_size": F,
    "n_routed_experts": E,
    "n_shared_experts": S,
    "num_experts_per_tok": 3,
    "route_scale": 2.5,
}
CASES = {
    "inkling": ("inkling", "InklingTextConfig", INKLING),
    "inkling2": ("inkling2", "Inkling2TextConfig", INKLING2),
    "inkling2_loop": ("inkling2_loop", "Inkling2LoopTextConfig", INKLING2),
}
NAMES = sorted(CASES)
ROWS = {f.name: f for f in FAMILIES}


@functools.cache
def _block(name: str) -> nn.Module:
    """The tiny float32 block: N(0, 0.5²) weights, N(0, 0.1²) selection bias, eval."""
    folder, config_class, kwargs = CASES[name]
    config = getattr(transformers, config_class)(**kwargs)
    module = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    block = getattr(module, ROWS[name].block_class)(config)
    g = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for b in block.buffers():  # the selection bias: zeros would hide a missed buffer
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return block.eval()


def _float32_casts_removed(block: nn.Module) -> None:
    """Run ``block``'s forward with ``Tensor.float`` as the identity."""
    forward = block.forward

    def run(*args: Tensor) -> Tensor:
        with mock.patch.object(torch.Tensor, "float", lambda t, *a, **k: t):
            return forward(*args)

    block.forward = run


def _fresh(name: str, dtype: torch.dtype, as_is: bool = False) -> nn.Module:
    """A copy in ``dtype``; Inkling2's router stays float32, as ``from_pretrained`` loads it.

    In float64, unless ``as_is``, HF's float32 casts are removed (see the module docstring).
    """
    block = copy.deepcopy(_block(name))
    if name == "inkling":
        block.to(dtype)
        if dtype == torch.float64 and not as_is:
            _float32_casts_removed(block)
        return block
    block.experts.to(dtype)
    if dtype == torch.float64 and not as_is:
        block.experts.config._experts_implementation = "batched_mm"
        act = block.experts.act_fn  # HF's own soft caps and sigmoid, minus the .float()
        act.forward = lambda gate, up: (
            act.gate_softcap(gate) * torch.sigmoid(gate) * act.up_softcap(up)
        )
    return block


def _layer(block: nn.Module, dtype: torch.dtype) -> MoELayer:
    layer = from_hf(block)
    if dtype == torch.float64:  # the float32 casts removed, as on HF's side
        if isinstance(layer.router.selection, AlwaysOnTopK):  # Inkling
            layer.router.routing_dtype = None
            layer.router.scorer.compute_dtype = "input"
        else:
            layer.experts.activation = dataclasses.replace(layer.experts.activation, dtype=None)
    return layer


def _hf_route(name: str, block: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """HF's (router logits, chosen routed experts), in the dtype the block runs it."""
    if name != "inkling":
        return _route(block, tokens)
    if tokens.dtype == torch.float64:  # as the block's forward runs it here
        with mock.patch.object(torch.Tensor, "float", lambda t, *a, **k: t):
            logits, _, experts, _ = block.gate(tokens)
    else:
        logits, _, experts, _ = block.gate(tokens)
    return logits, experts


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
    layer = _layer(block, dtype)
    x = _inputs(block, dtype, skew)
    _compare(name, block, layer, x)

    logits, experts = _hf_route(name, block, x.reshape(-1, D))
    routing = layer(x).routing
    K, n = experts.shape[1], routing.num_experts
    # The same F.linear on both sides; HF records the routed experts' logits only.
    torch.testing.assert_close(routing.scores[:, : logits.shape[1]], logits, rtol=0, atol=0)
    assert torch.equal(routing.experts[:, :K].sort(-1).values, experts.sort(-1).values)
    always = torch.arange(logits.shape[1], n).expand(x.shape[0] * x.shape[1], -1)
    assert torch.equal(routing.experts[:, K:], always)  # Inkling's shared experts, last
    if skew:
        counts = torch.bincount(routing.experts.reshape(-1), minlength=n)
        assert (counts == 0).any(), "the skewed input should leave an expert without token"


@pytest.mark.parametrize("name", NAMES)
def test_family_matches_hf_in_training_mode(name: str) -> None:
    # No jitter or dropout in these blocks: HF's training mode is deterministic.
    block = _fresh(name, torch.float64).train()
    layer = _layer(block, torch.float64)
    assert layer.training
    _compare(name, block, layer, _inputs(block, torch.float64, skew=False))


@pytest.mark.parametrize("name", NAMES)
def test_hf_untouched_float64_block_is_float32_precise(name: str) -> None:
    block = _fresh(name, torch.float64, as_is=True)
    layer = from_hf(block)  # as converted: float32 where HF computes in float32
    x = _inputs(block, torch.float64, skew=False)
    with torch.no_grad():
        err = _rel(layer(x).out, block(x))
    # HF rounds to float32 (2^-24 ≈ 6e-8) where moeblocks keeps float64: Inkling2's
    # eager accumulator, Inkling's routing weights (another formula) and shared sum. Far
    # from the float64 ≤ 1e-10 the structure meets above.
    assert 1e-12 < err <= 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_family_round_trip_is_bitwise(name: str) -> None:
    block = _block(name)
    assert_round_trip_bitwise(name, block, copy.deepcopy(block))


# Inkling's router logits differ in shape from HF's (E + S columns): the test compares the
# first E.
WHOLE = {
    "inkling": ("InklingTextConfig", "InklingForCausalLM", {**INKLING, "n_routed_experts": 4}),
    "inkling2": ("Inkling2TextConfig", "Inkling2ForCausalLM", INKLING2),
    "inkling2_loop": ("Inkling2LoopTextConfig", "Inkling2LoopForCausalLM", INKLING2),
}


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_swap_and_capture_a_whole_model(name: str) -> None:
    from moeblocks.hf import capture_routing, swap_moe_blocks, unswap_moe_blocks

    config, model_class, kwargs = WHOLE[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config)(**{**kwargs, **TINY}))
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids, output_router_logits=True)
        assert swap_moe_blocks(model) == 2
        after = model(ids, output_router_logits=True)
        with capture_routing(model) as rec:
            model(ids)
    # The same blocks, summed in another order: float32 rounding only.
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-6)
    for a, b in zip(after.router_logits, before.router_logits, strict=True):
        # HF records Inkling's E routed logits; the layer scores its S shared experts too.
        torch.testing.assert_close(a[:, : b.shape[1]], b, rtol=1e-5, atol=1e-6)
    assert [len(r) for r in rec.routings.values()] == [1, 1]
    unswap_moe_blocks(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
