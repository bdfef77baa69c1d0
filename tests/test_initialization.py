"""Construction apart from initialisation: every block builds on ``meta``, and
``materialize`` (``to_empty`` + ``init_weights``) gives bit for bit the tensors of eager
construction under the same seed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import moeblocks as mb
from moeblocks.gating import NormedScorer
from moeblocks.sra.config import PRESETS
from moeblocks.sra.model import SRATransformer

D, E, F = 12, 6, 10


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    # Non-persistent buffers too (the SRA model's RoPE tables).
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def assert_meta_then_init_equals_eager(build: Callable[[], nn.Module], seed: int = 0) -> None:
    torch.manual_seed(seed)
    eager = build()
    rng = torch.get_rng_state()
    with torch.device("meta"):
        lazy = build()
    assert torch.equal(torch.get_rng_state(), rng), "building on meta drew random numbers"
    assert all(t.is_meta for t in _state(lazy).values())
    torch.manual_seed(seed)
    mb.materialize(lazy, "cpu")
    want, got = _state(eager), _state(lazy)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].device.type == "cpu", name
        assert got[name].dtype == tensor.dtype, name
        # Exact: the same draws in the same order, not merely the same distribution.
        assert torch.equal(got[name], tensor), name


def _layer(**router_kw: object) -> mb.MoELayer:
    router = mb.Router(mb.CosineScorer(D, E), mb.StepK({0: 1, 5: 2}), **router_kw)  # type: ignore[arg-type]
    return mb.MoELayer(
        router,
        mb.TorchDispatcher(),
        mb.GELUExperts(E, D, F, bias=True, init=mb.ExpertInit(std=0.02, out_scale=0.5)),
        {"band": mb.BandpassLoss(0.1, 0.3), "dispersion": mb.DispersionLoss()},
        shared=mb.SharedExperts(mb.SwiGLUExperts(2, D, F), gate=True),
    )


BLOCKS: dict[str, Callable[[], nn.Module]] = {
    "linear scorer": lambda: mb.LinearScorer(D, E),
    "linear scorer, bias, std": lambda: mb.LinearScorer(D, E, bias=True, init_std=0.02),
    "product-key scorer": lambda: mb.ProductKeyScorer(D, 3, pairing="batch"),
    "cosine scorer, orthogonal": lambda: mb.CosineScorer(D, E, temperature=3.0),
    "cosine scorer, kaiming": lambda: mb.CosineScorer(D, E, init="kaiming"),
    "cosine scorer, batch": lambda: mb.CosineScorer(D, E, init="batch"),
    "bias balancer": lambda: mb.BiasBalancer(E),
    "step schedule": lambda: mb.StepK({0: 1, 10: 3}),
    "router with balancer": lambda: mb.Router(
        mb.LinearScorer(D, E), 2, scoring="sigmoid", balancer=mb.BiasBalancer(E)
    ),
    "swiglu experts": lambda: mb.SwiGLUExperts(E, D, F),
    "swiglu experts, bias": lambda: mb.SwiGLUExperts(E, D, F, bias=True),
    "mlp experts": lambda: mb.MLPExperts(E, D, F, activation="relu"),
    "gelu experts, std": lambda: mb.GELUExperts(E, D, F, init=mb.ExpertInit(std=0.02)),
    "shared experts, gated": lambda: mb.SharedExperts(mb.SwiGLUExperts(1, D, F), gate=True),
    "constant experts": lambda: mb.ConstantExperts(E, D),
    "latent projection, bias, norm": lambda: mb.LatentProjection(
        D, F, bias=True, norm=mb.RMSNorm(F, offset=1.0)
    ),
    "per-expert rms norm": lambda: mb.RMSNorm(D, num_experts=E),
    "normed experts": lambda: mb.NormedExperts(mb.MLPExperts(E, D, F), mb.RMSNorm(D)),
    "linear experts": lambda: mb.LinearExperts(E, D, F),
    "routed linear": lambda: mb.RoutedLinear(
        mb.Router(mb.LinearScorer(D, E), 2), mb.TorchDispatcher(), F
    ),
    "layer with a latent space": lambda: mb.MoELayer(
        mb.Router(mb.LinearScorer(D, E), 2),
        mb.TorchDispatcher(),
        mb.MLPExperts(E, F, F, activation="relu2"),
        latent=mb.LatentProjection(D, F),
    ),
    "constant-scaled experts": lambda: mb.ConstantScaledExperts(mb.SwiGLUExperts(E, D, F), 2.5),
    "hash selection": lambda: mb.HashSelection(16, 2, E),
    "router with hash selection": lambda: mb.Router(
        mb.LinearScorer(D, E), 2, scoring="sqrt_softplus", selection=mb.HashSelection(16, 2, E)
    ),
    "layer": _layer,
    "layer with balancer": lambda: _layer(balancer=mb.BiasBalancer(E)),
    # a bank beside parameter-free experts (they have nothing to initialise).
    "concat experts, identity, zero": lambda: mb.ConcatExperts(
        mb.SwiGLUExperts(E, D, F), mb.IdentityExperts(2, D), mb.ZeroExperts(1, D)
    ),
    "scaled experts": lambda: mb.ScaledExperts(mb.SwiGLUExperts(E, D, F), init=0.5),
    # the parts of a decoder-inline MoE (Gemma-4) and of AXK-1's output norm.
    "rms norm, llama order, pow": lambda: mb.RMSNorm(D, weight_dtype="input", inverse_root="pow"),
    "rms norm, no weight": lambda: mb.RMSNorm(D, elementwise_affine=False),
    "scaled experts, per expert": lambda: mb.ScaledExperts(
        mb.SwiGLUExperts(E, D, F), 0.5, per_expert=True
    ),
    "normed experts, input and output norms": lambda: mb.NormedExperts(
        mb.SwiGLUExperts(1, D, F), mb.RMSNorm(D), input_norm=mb.RMSNorm(D, offset=1.0)
    ),
    "normed scorer": lambda: NormedScorer(mb.LinearScorer(D, E), mb.RMSNorm(D), D**-0.5),
    "layer with norms": lambda: mb.MoELayer(
        mb.Router(mb.LinearScorer(D, E), 2),
        mb.TorchDispatcher(),
        mb.SwiGLUExperts(E, D, F),
        routed_norm=mb.RMSNorm(D),
        out_norm=mb.RMSNorm(D, weight_dtype="input"),
        routed_input_norm=mb.RMSNorm(D, inverse_root="pow"),
    ),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_built_on_meta_initialises_as_eager(name: str) -> None:
    assert_meta_then_init_equals_eager(BLOCKS[name])


def test_reset_restores_the_initial_state() -> None:
    torch.manual_seed(1)
    layer = _layer(balancer=mb.BiasBalancer(E))
    first = {k: v.clone() for k, v in _state(layer).items()}
    layer.router.schedule.set_step(7)
    layer.router.balancer.observe(torch.tensor([[0], [1]]))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    torch.manual_seed(1)
    mb.init_weights(layer)
    assert layer.router.schedule.k == 1  # the Python mirror of the step, too
    for name, tensor in _state(layer).items():
        assert torch.equal(tensor, first[name]), name


def test_a_batch_seeded_scorer_waits_for_its_batch_again_after_reset() -> None:
    scorer = mb.CosineScorer(D, E, init="batch").train()
    scorer(torch.randn(8, D))
    assert not scorer.needs_seed
    scorer.reset_parameters()
    assert scorer.needs_seed
    assert not bool(scorer.seeded)


def test_materialize_keeps_tied_weights_tied() -> None:
    config = PRESETS["tiny"].replace(n_layers=1)
    with torch.device("meta"):
        model = SRATransformer(config)
    mb.materialize(model, "cpu")
    assert model.head.weight is model.embed.weight
    assert len(list(model.parameters())) == len(set(map(id, model.parameters())))


SRA_SHAPES = {
    "tiny": PRESETS["tiny"],
    "tiny dense": PRESETS["tiny"].replace(ffn="dense"),
    "small": PRESETS["small"],
    # The paper's shape (D 512, 256 experts of 256, V 32000) with one of its four
    # layers: 84 M of the 290 M parameters, enough to compare every kind of tensor.
    "paper, 1 layer": PRESETS["paper"].replace(n_layers=1),
    "paper-linear, 1 layer": PRESETS["paper-linear"].replace(n_layers=1),
}


@pytest.mark.parametrize("name", list(SRA_SHAPES))
def test_sra_model_built_on_meta_initialises_as_eager(name: str) -> None:
    assert_meta_then_init_equals_eager(lambda: SRATransformer(SRA_SHAPES[name]), seed=19)


def test_sra_gpt2_init_is_the_recipe() -> None:
    # The recipe itself, not only eager == meta: N(0, 0.02) embeddings and gates, the
    # residual projections N(0, 0.02 / sqrt(2L)), zero biases.
    torch.manual_seed(0)
    config = PRESETS["small"].replace(ffn="linear")
    model = SRATransformer(config)
    resid = 0.02 / (2 * config.n_layers) ** 0.5
    # Sample std of >= 65k draws: within 3 % of the target (about 10 standard errors).
    for tensor, std in [
        (model.embed.weight, 0.02),
        (model.blocks[0].attn.qkv.weight, 0.02),
        (model.blocks[0].attn.proj.weight, resid),
        (model.blocks[0].ffn.router.gate_weight, 0.02),
        (model.blocks[0].ffn.experts.w_out_EFD, resid),
    ]:
        assert abs(float(tensor.detach().std()) / std - 1) < 0.03
    assert not model.blocks[0].attn.qkv.bias.any()


def test_paper_preset_builds_on_meta_without_memory() -> None:
    with torch.device("meta"):
        model = SRATransformer(PRESETS["paper"])
    assert model.num_params() == 290_341_892
    assert all(p.is_meta for p in model.parameters())
