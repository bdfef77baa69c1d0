"""Family rows whose HF router the ``Spec`` machinery of ``test_hf_families`` cannot call.

JetMoE's MoE block keeps its router weight in ``router.layer`` and its router returns
the grouped topology (``index_sorted_experts, batch_index, batch_gates, expert_size,
logits``), not ``(logits, weights, experts)``. The block is compared with the converted
layer by ``test_hf_families._compare`` (outputs, input and every weight gradient, fp32
and fp64, eval and training mode, plain and skewed routing), plus its router logits and
chosen experts read from that topology.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import hf_errors
import pytest
import torch
import transformers
from test_hf_families import D, E, F, _compare
from torch import Tensor, nn

from moeblocks.hf import from_hf, to_hf

HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1, "kv_channels": 8}
JETMOE = {"hidden_size": D, "intermediate_size": F, "num_local_experts": E, **HEADS}


@functools.cache
def _jetmoe() -> nn.Module:
    """The tiny JetMoeMoE: N(0, 0.5²) weights (its output bias too), eval."""
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoE

    block = JetMoeMoE(transformers.JetMoeConfig(**JETMOE, num_experts_per_tok=2))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return block.eval()


def _fresh(dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(_jetmoe()).to(dtype)


def _jetmoe_route(gate: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """HF's (logits [T, E], chosen experts [T, K]) rebuilt from its grouped topology."""
    index_sorted, _, _, expert_size, logits = gate(tokens)
    T, K = tokens.shape[0], gate.top_k
    expert_of_slot = torch.repeat_interleave(torch.arange(E), torch.tensor(expert_size))
    experts = torch.empty(T * K, dtype=torch.long)
    experts[index_sorted] = expert_of_slot
    return logits, experts.view(T, K)


def _inputs(block: nn.Module, dtype: torch.dtype, skew: bool) -> Tensor:
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if skew:  # most tokens pick the same experts along one router row: others get none
        w = block.router.layer.weight[3].detach().to(dtype)
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
def test_jetmoe_matches_hf_in_eval_mode(skew: bool, dtype: torch.dtype) -> None:
    block = _fresh(dtype)
    layer = from_hf(block)
    x = _inputs(block, dtype, skew)
    _compare("jetmoe", block, layer, x)
    logits, experts = _jetmoe_route(block.router, x.reshape(-1, D))
    routing = layer(x).routing
    # The same F.linear, cast to float32 as HF does.
    torch.testing.assert_close(routing.scores, logits, rtol=0, atol=0)
    assert torch.equal(routing.experts.sort(-1).values, experts.sort(-1).values)
    if skew:
        counts = torch.bincount(routing.experts.reshape(-1), minlength=E)
        assert (counts == 0).any(), "the skewed input should leave an expert without token"


def test_jetmoe_matches_hf_in_training_mode() -> None:
    # No jitter, no dropout: HF's training mode is deterministic.
    block = _fresh(torch.float64).train()
    layer = from_hf(block)
    assert layer.training
    _compare("jetmoe", block, layer, _inputs(block, torch.float64, skew=False))


def test_jetmoe_round_trip_is_bitwise() -> None:
    block = _jetmoe()
    target = _fresh(torch.float32)
    with torch.no_grad():
        for t in target.parameters():
            t.add_(1.0)
    to_hf(from_hf(block), target)
    for (key, a), (_, b) in zip(
        block.state_dict().items(), target.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), f"jetmoe: {key} not restored bit for bit"
