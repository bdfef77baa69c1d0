"""Decoder-inline MoE (Gemma-4, DiffusionGemma): the MoE part of a decoder layer.

These families keep their router, experts and norms in the decoder layer itself, so
``from_hf(layer)`` builds the part of the layer that runs from the residual stream to
what is added back to it (``post_feedforward_layernorm``'s output): the dense MLP branch
and the routed branch with their norms, and the normalising router. HF's own layer is
the oracle: its attention is replaced by a stub that adds nothing (so the MoE part sees
the layer's input as its residual) and a forward hook on ``post_feedforward_layernorm``
returns HF's MoE output. Outputs, router probabilities, chosen experts, the input
gradient and the gradient of every weight of the MoE part are compared in fp32 and fp64,
eval and training mode, plain and skewed routing; ``to_hf(from_hf(layer))`` restores
the MoE part bit for bit and writes nothing else.
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Iterator
from dataclasses import dataclass

import hf_errors
import pytest
import torch
import transformers
from test_hf_families import TOL, _rel
from torch import Tensor, nn

from moeblocks.hf import family_of, from_hf, to_hf
from moeblocks.layer import MoELayer

D, F, E, K = 16, 8, 8, 2
# The weights of the MoE part; everything else in the layer (attention, its norms, the
# layer scalar) belongs to the decoder and is neither read nor written.
MOE_PARTS = (
    "router.",
    "experts.",
    "mlp.",
    "pre_feedforward_layernorm.",
    "post_feedforward_layernorm.",
    "pre_feedforward_layernorm_2.",
    "post_feedforward_layernorm_1.",
    "post_feedforward_layernorm_2.",
)
TINY = {
    "hidden_size": D,
    "intermediate_size": F,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "num_experts": E,
    "top_k_experts": K,
    "moe_intermediate_size": F,
    "num_hidden_layers": 2,
    "vocab_size": 64,
}


@dataclass(frozen=True)
class InlineSpec:
    folder: str
    config: str
    layer_class: str
    kwargs: dict


SPECS = {
    "gemma4": InlineSpec(
        "gemma4",
        "Gemma4TextConfig",
        "Gemma4TextDecoderLayer",
        {**TINY, "enable_moe_block": True, "hidden_size_per_layer_input": 0},
    ),
    # The same MoE part, copied into the encoder and decoder layers of DiffusionGemma.
    "diffusion_gemma_encoder": InlineSpec(
        "diffusion_gemma", "DiffusionGemmaTextConfig", "DiffusionGemmaEncoderTextLayer", TINY
    ),
    "diffusion_gemma_decoder": InlineSpec(
        "diffusion_gemma", "DiffusionGemmaTextConfig", "DiffusionGemmaDecoderTextLayer", TINY
    ),
}
NAMES = sorted(SPECS)


class _NoAttention(nn.Module):
    """Adds nothing to the residual stream: the MoE part sees the layer's input."""

    def forward(self, hidden_states: Tensor, **kwargs: object) -> tuple[Tensor, None]:
        return torch.zeros_like(hidden_states), None


@functools.cache
def _layer(name: str) -> nn.Module:
    """The tiny decoder layer, built once: N(0, 0.5²) weights, N(0, 0.1²) buffers, eval."""
    spec = SPECS[name]
    config = getattr(transformers, spec.config)(**spec.kwargs)
    module = importlib.import_module(f"transformers.models.{spec.folder}.modeling_{spec.folder}")
    layer = getattr(module, spec.layer_class)(config, 0)
    g = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for b in layer.buffers():  # the layer scalar: zeros would hide a missed buffer
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    layer.self_attn = _NoAttention()
    return layer.eval()


def _fresh(name: str, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(_layer(name)).to(dtype)


def _hf_moe(layer: nn.Module, x: Tensor) -> Tensor:
    """HF's MoE part of ``layer`` on the residual ``x``: what it adds back to ``x``."""
    out: list[Tensor] = []
    handle = layer.post_feedforward_layernorm.register_forward_hook(lambda _m, _a, y: out.append(y))
    try:
        layer(x)
    finally:
        handle.remove()
    return out[0]


def _inputs(layer: nn.Module, dtype: torch.dtype, skew: bool) -> Tensor:
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if skew:
        # Along one router row (through its scale), most tokens pick the same experts.
        w = (layer.router.proj.weight[3] * layer.router.scale).detach().to(dtype)
        x = 0.1 * x + 4 * w / w.norm()
    return x


def _moe_grads(layer: MoELayer, block: nn.Module) -> Iterator[tuple[str, Tensor, Tensor]]:
    """(name, HF's gradient, the layer's mapped into HF's layout) per MoE-part weight."""
    grads = copy.deepcopy(layer)
    with torch.no_grad():
        for p_grad, p in zip(grads.parameters(), layer.parameters(), strict=True):
            p_grad.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    mapped = copy.deepcopy(block)
    to_hf(grads, mapped)
    for (name, p_hf), (_, g) in zip(
        block.named_parameters(), mapped.named_parameters(), strict=True
    ):
        if name.startswith(MOE_PARTS):
            yield name, (p_hf.grad if p_hf.grad is not None else torch.zeros_like(p_hf)), g


def _compare(name: str, block: nn.Module, layer: MoELayer, x: Tensor) -> None:
    dtype = x.dtype
    x_hf, x_mb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = _hf_moe(block, x_hf)
    res = layer(x_mb)
    assert res.out.dtype == dtype
    errs = [_rel(res.out, ref)]
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    (ref * g).sum().backward()
    (res.out * g).sum().backward()
    errs.append(_rel(x_mb.grad, x_hf.grad))
    seen = 0
    for pname, expected, got in _moe_grads(layer, block):
        # Experts that got no token have zero gradient on both sides: floor the norm at 1.
        err = _rel(got, expected, floor=1.0)
        assert err <= TOL[dtype], f"{name}: gradient of {pname} differs by {err:.3g}"
        errs.append(err)
        seen += 1
    assert seen == 13, (
        f"{name}: {seen} MoE-part weights compared"
    )  # router 3, experts 2, mlp 3, norms 5
    assert max(errs[:2]) <= TOL[dtype], f"{name}: output/input-gradient errors {errs[:2]}"
    hf_errors.record(name, dtype, max(errs))


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
def test_inline_moe_matches_hf_in_eval_mode(name: str, skew: bool, dtype: torch.dtype) -> None:
    block = _fresh(name, dtype)
    layer = from_hf(block)
    x = _inputs(block, dtype, skew)
    _compare(name, block, layer, x)

    probs, _, experts = block.router(x.reshape(-1, D))
    routing = layer(x).routing
    # The same norm, projection and float32 softmax: bit for bit.
    torch.testing.assert_close(routing.probs, probs, rtol=0, atol=0)
    assert torch.equal(routing.experts.sort(-1).values, experts.sort(-1).values)
    if skew:
        counts = torch.bincount(routing.experts.reshape(-1), minlength=E)
        assert (counts == 0).any(), "the skewed input should leave an expert without token"


@pytest.mark.parametrize("name", NAMES)
def test_inline_moe_matches_hf_in_training_mode(name: str) -> None:
    # No jitter and no dropout in the MoE part: HF's training mode is deterministic.
    block = _fresh(name, torch.float64).train()
    layer = from_hf(block)
    assert layer.training
    _compare(name, block, layer, _inputs(block, torch.float64, skew=False))


@pytest.mark.parametrize("name", NAMES)
def test_inline_round_trip_is_bitwise_and_touches_only_the_moe_part(name: str) -> None:
    block = _layer(name)
    target = _fresh(name, torch.float32)
    with torch.no_grad():
        for t in [*target.parameters(), *target.buffers()]:
            t.add_(1.0)  # different values everywhere
    to_hf(from_hf(block), target)
    for (key, a), (_, b) in zip(
        block.state_dict().items(), target.state_dict().items(), strict=True
    ):
        if key.startswith(MOE_PARTS):
            assert torch.equal(a, b), f"{name}: {key} not restored bit for bit"
        else:  # the decoder's own weights are not the MoE part's
            assert torch.equal(a + 1, b), f"{name}: to_hf wrote {key}"


def test_a_layer_without_moe_is_not_converted() -> None:
    from transformers.models.gemma4 import modeling_gemma4

    config = transformers.Gemma4TextConfig(**{**TINY, "hidden_size_per_layer_input": 0})
    dense = modeling_gemma4.Gemma4TextDecoderLayer(config, 0)
    with pytest.raises(TypeError, match="do not convert Gemma4TextDecoderLayer"):
        from_hf(dense)


def _gemma4_model() -> nn.Module:
    config = transformers.Gemma4TextConfig(**SPECS["gemma4"].kwargs, max_position_embeddings=64)
    return transformers.Gemma4ForCausalLM(config)


def _diffusion_gemma_model() -> nn.Module:
    # An encoder for the prompt and a decoder for a 4-token canvas: 2 + 2 MoE layers. The
    # vision tower is unused here; its default size (167M weights) would take seconds.
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 8}
    vision |= {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}
    config = transformers.DiffusionGemmaConfig(
        text_config={**TINY, "max_position_embeddings": 64},
        vision_config=vision,
        canvas_length=4,
    )
    return transformers.DiffusionGemmaForBlockDiffusion(config)


WHOLE = {
    "gemma4": (
        _gemma4_model,
        lambda model, ids: model(ids, output_router_logits=True),
        ["model.layers.0", "model.layers.1"],
    ),
    "diffusion_gemma": (
        _diffusion_gemma_model,
        lambda model, ids: model(input_ids=ids, decoder_input_ids=ids[:, :4]),
        [
            "model.encoder.language_model.layers.0",
            "model.encoder.language_model.layers.1",
            "model.decoder.layers.0",
            "model.decoder.layers.1",
        ],
    ),
}


# The family rows each whole model swaps and captures (test_hf_families.py reads this).
ROWS_OF_WHOLE = {
    "gemma4": ("gemma4",),
    "diffusion_gemma": ("diffusion_gemma_encoder", "diffusion_gemma_decoder"),
}


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_swap_and_capture_a_whole_model(name: str) -> None:
    from moeblocks.hf import HFInlineMoE, capture_routing, swap_moe_blocks, unswap_moe_blocks

    build, call, layers = WHOLE[name]
    torch.manual_seed(0)
    model = build().eval()
    rows = {family_of(model.get_submodule(n)).name for n in layers}
    assert rows == set(ROWS_OF_WHOLE[name]), name
    with torch.no_grad():  # away from the init's ones and zeros (norms, scales)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = call(model, ids)
        with capture_routing(model) as hf_rec:
            call(model, ids)
        assert swap_moe_blocks(model) == len(layers)
        after = call(model, ids)
        with capture_routing(model) as rec:
            call(model, ids)
    decoder = model.get_submodule(layers[0])
    assert isinstance(decoder.experts, HFInlineMoE)
    assert type(decoder.self_attn).__name__.endswith("Attention"), "the attention stays HF's"
    # The same MoE parts, summed in another order: float32 rounding only.
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-5, atol=1e-6)
    if getattr(before, "router_logits", None) is not None:  # what the HF router returned
        assert len(after.router_logits) == len(before.router_logits) == len(layers)
        for a, b in zip(after.router_logits, before.router_logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Every layer records once, under the decoder layer's name, swapped or not.
    assert list(rec.routings) == list(hf_rec.routings) == layers
    assert all(len(r) == 1 for r in rec.routings.values())
    for mine, hf in zip(rec.last(), hf_rec.last(), strict=True):
        assert torch.equal(mine.experts.sort(-1).values, hf.experts.sort(-1).values)
    assert unswap_moe_blocks(model) == len(layers)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        torch.testing.assert_close(call(model, ids).logits, before.logits, rtol=0, atol=0)
