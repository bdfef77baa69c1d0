"""Family rows whose HF router the ``Spec`` machinery of ``test_hf_families`` cannot call.

JetMoE's MoE block keeps its router weight in ``router.layer`` and its router returns
the grouped topology (``index_sorted_experts, batch_index, batch_gates, expert_size,
logits``), not ``(logits, weights, experts)``; Ergo's router keeps its weight in
``gate.linear``. Each block is compared with the converted layer by
``test_hf_families._compare`` (outputs, input and every weight gradient, fp32 and fp64,
eval and training mode, plain and skewed routing), plus its router logits and chosen
experts. NemotronH with ``mlp_bias=True`` (biases on its latent projections and shared
MLP) is checked here too; its plain form is a ``Spec`` of ``test_hf_families``.
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
from test_hf_families import D, E, F, _compare, _route
from torch import Tensor, nn

from moeblocks.hf import from_hf

HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1, "kv_channels": 8}
JETMOE = {"hidden_size": D, "intermediate_size": F, "num_local_experts": E, **HEADS}
ERGO = {
    "hidden_size": D,
    "moe_intermediate_size": F,
    "shared_intermediate_size": 2 * F,
    "num_experts": E,
    "num_experts_per_tok": 3,
    "moe_routed_scaling_factor": 2.5,
    "rms_norm_eps": 1e-6,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
}
NEMOTRON_BIAS = {
    "hidden_size": D,
    "moe_intermediate_size": F,
    "n_routed_experts": E,
    "num_experts_per_tok": 3,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "moe_latent_size": 12,
    "moe_shared_expert_intermediate_size": 2 * F,
    "mlp_bias": True,
}


def _random(block: nn.Module, seed: int) -> nn.Module:
    """N(0, 0.5²) weights (biases and norm weights too), N(0, 0.1²) buffers, eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for b in block.buffers():  # selection biases: zeros would hide a missed buffer
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return block.eval()


@functools.cache
def _block(name: str) -> nn.Module:
    """The family's tiny block, built once."""
    if name == "jetmoe":
        from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoE

        block = JetMoeMoE(transformers.JetMoeConfig(**JETMOE, num_experts_per_tok=2))
    elif name == "ergo":
        from transformers.models.ergo.modeling_ergo import ErgoMoE

        block = ErgoMoE(transformers.ErgoConfig(**ERGO))
    else:
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

        block = NemotronHMoE(transformers.NemotronHConfig(**NEMOTRON_BIAS))
    return _random(block, len(name))


def _fresh(name: str, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(_block(name)).to(dtype)


def _jetmoe_route(gate: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """HF's (logits [T, E], chosen experts [T, K]) rebuilt from its grouped topology."""
    index_sorted, _, _, expert_size, logits = gate(tokens)
    T, K = tokens.shape[0], gate.top_k
    expert_of_slot = torch.repeat_interleave(torch.arange(E), torch.tensor(expert_size))
    experts = torch.empty(T * K, dtype=torch.long)
    experts[index_sorted] = expert_of_slot
    return logits, experts.view(T, K)


def _route_of(name: str, block: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    return _jetmoe_route(block.router, tokens) if name == "jetmoe" else _route(block, tokens)


def _router_weight(name: str, block: nn.Module) -> Tensor:
    return {
        "jetmoe": lambda: block.router.layer.weight,
        "ergo": lambda: block.gate.linear.weight,
        "nemotron_h": lambda: block.gate.weight,
    }[name]()


def _inputs(name: str, block: nn.Module, dtype: torch.dtype, skew: bool) -> Tensor:
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if skew:  # most tokens pick the same experts along one router row: others get none
        w = _router_weight(name, block)[3].detach().to(dtype)
        x = 0.1 * x + 4 * w / w.norm()
    return x


NAMES = ["ergo", "jetmoe", "nemotron_h"]


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
    logits, experts = _route_of(name, block, x.reshape(-1, D))
    routing = layer(x).routing
    # The same F.linear, in the routing dtype (float32: these routers score in float32).
    torch.testing.assert_close(routing.scores, logits.to(routing.scores.dtype), rtol=0, atol=0)
    assert torch.equal(routing.experts.sort(-1).values, experts.sort(-1).values)
    if skew:
        counts = torch.bincount(routing.experts.reshape(-1), minlength=E)
        assert (counts == 0).any(), "the skewed input should leave an expert without token"


@pytest.mark.parametrize("name", NAMES)
def test_family_matches_hf_in_training_mode(name: str) -> None:
    # No jitter, no dropout: HF's training mode is deterministic.
    block = _fresh(name, torch.float64).train()
    layer = from_hf(block)
    assert layer.training
    _compare(name, block, layer, _inputs(name, block, torch.float64, skew=False))


@pytest.mark.parametrize("name", NAMES)
def test_family_round_trip_is_bitwise(name: str) -> None:
    block = _block(name)
    assert_round_trip_bitwise(name, block, _fresh(name, torch.float32))


def test_nemotron_h_with_biases_reads_every_bias() -> None:
    layer = from_hf(_block("nemotron_h"))
    assert layer.latent.has_bias
    assert layer.shared.experts.has_bias


def test_nemotron_h_without_a_latent_space_has_no_latent_projection() -> None:
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    config = {k: v for k, v in NEMOTRON_BIAS.items() if k not in ("moe_latent_size", "mlp_bias")}
    block = _random(NemotronHMoE(transformers.NemotronHConfig(**config)), 3).double()
    layer = from_hf(block)
    assert layer.latent is None
    _compare("nemotron_h", block, layer, _inputs("nemotron_h", block, torch.float64, skew=False))
