"""from_hf / to_hf against Hugging Face's own sparse-MoE blocks (the oracle).

Every block is built from transformers' config class with random weights (nothing is
downloaded) and compared with the converted moeblocks layer: outputs, router logits,
chosen experts, combine weights, and the gradients of the input and of every weight.
Weight gradients are compared by writing the layer's gradients into a copy of the HF
block with ``to_hf`` (the same mapping as the weights), so an HF parameter the mapping
misses fails the test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import hf_errors
import pytest
import torch
import transformers
from torch import Tensor, nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP,
)

import moeblocks as mb
from moeblocks.hf import family_of, from_hf, to_hf

# Tiny blocks gain nothing from intra-op threads; on a busy machine they only wait.
pytestmark = pytest.mark.usefixtures("one_thread")

D, F, E = 16, 8, 8


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[int], nn.Module]  # k -> block
    k: int = 2


def _mixtral(k: int) -> nn.Module:
    cfg = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k
    )
    return MixtralSparseMoeBlock(cfg)


def _qwen2(k: int, norm: bool = False) -> nn.Module:
    cfg = transformers.Qwen2MoeConfig(
        hidden_size=D,
        moe_intermediate_size=F,
        shared_expert_intermediate_size=2 * F,
        num_experts=E,
        num_experts_per_tok=k,
        norm_topk_prob=norm,
    )
    return Qwen2MoeSparseMoeBlock(cfg)


def _qwen3(k: int) -> nn.Module:
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=k
    )
    return Qwen3MoeSparseMoeBlock(cfg)


def _olmoe(k: int) -> nn.Module:
    cfg = transformers.OlmoeConfig(
        hidden_size=D, intermediate_size=F, num_experts=E, num_experts_per_tok=k
    )
    return OlmoeSparseMoeBlock(cfg)


def _deepseek_kwargs(k: int, norm: bool) -> dict:
    return {
        "hidden_size": D,
        "moe_intermediate_size": F,
        "n_routed_experts": E,
        "num_experts_per_tok": k,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": norm,
    }


def _deepseek(k: int, norm: bool = True) -> nn.Module:
    return DeepseekV3MoE(transformers.DeepseekV3Config(**_deepseek_kwargs(k, norm)))


def _glm4(k: int) -> nn.Module:
    return Glm4MoeMoE(transformers.Glm4MoeConfig(**_deepseek_kwargs(k, True)))


def _gpt_oss(k: int) -> nn.Module:
    cfg = transformers.GptOssConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k
    )
    return GptOssMLP(cfg)


def _llama4(k: int) -> nn.Module:
    cfg = transformers.Llama4TextConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k
    )
    return Llama4TextMoe(cfg)


def _switch(k: int) -> nn.Module:
    cfg = transformers.SwitchTransformersConfig(
        d_model=D, d_ff=F, num_experts=E, expert_capacity=3, router_bias=True
    )
    return SwitchTransformersSparseMLP(cfg)


CASES = [
    Case("mixtral", _mixtral),
    Case("mixtral-k1", _mixtral, k=1),
    Case("qwen2_moe", _qwen2),
    Case("qwen2_moe-norm", lambda k: _qwen2(k, norm=True)),
    Case("qwen3_moe", _qwen3),
    Case("qwen3_moe-k1", _qwen3, k=1),
    Case("olmoe", _olmoe),
    Case("deepseek_v3", _deepseek, k=3),
    Case("deepseek_v3-raw", lambda k: _deepseek(k, norm=False), k=3),
    Case("glm4_moe", _glm4, k=3),
    Case("gpt_oss", _gpt_oss),
    Case("gpt_oss-k1", _gpt_oss, k=1),
    Case("llama4", _llama4, k=1),
    Case("switch", _switch, k=1),
]


def _randomise(block: nn.Module, seed: int) -> nn.Module:
    """Fill every weight (and DeepSeek's correction bias) with N(0, 0.5²) values.

    Standalone HF blocks keep torch.empty / zero weights until a model initialises them;
    zero router weights would make every routing decision a tie.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, buf in block.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
    return block.eval()


def _out(block: nn.Module, x: Tensor) -> Tensor:
    """The block's output reshaped like x, whatever its family returns."""
    y = block(x)
    return (y[0] if isinstance(y, tuple) else y).reshape(x.shape)


def _hf_routing(block: nn.Module, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(router logits [T, E], chosen experts [T, K] sorted) from the HF router itself."""
    family = family_of(block)
    router = getattr(block, family.router_attr)
    flat = x.reshape(-1, D)
    out = router(x if family.name == "switch_transformers" else flat)
    logits = out[family.logits_index].reshape(-1, E)
    if family.name in ("llama4", "switch_transformers"):  # no index output (pre-capacity)
        experts = logits.topk(k, dim=-1).indices
    else:
        experts = out[2]
    return logits, experts.sort(dim=-1).values


def _inputs(dtype: torch.dtype, skew: bool, block: nn.Module) -> Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, D, generator=g, dtype=dtype)
    if skew:
        # A shared direction along which the router strongly prefers one expert, so most
        # experts get no token and one gets nearly all.
        family = family_of(block)
        router = getattr(block, family.router_attr)
        weight = router.classifier.weight if hasattr(router, "classifier") else router.weight
        w = weight[3].detach().to(dtype)
        x = 0.1 * x + 4 * w / w.norm()
    return x


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# fp32: the two sides sum the K weighted expert outputs in different orders (HF
# index_adds expert by expert, moeblocks sums each token's K copies), ~1e-7 relative;
# 1e-5 is the bound. fp64: the same reordering at double precision.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("skew", [False, True], ids=["plain", "skewed"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_from_hf_matches_block(case: Case, skew: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    block = _randomise(case.make(case.k), seed=0).to(dtype)
    layer = from_hf(block)
    x = _inputs(dtype, skew, block)
    x_hf = x.clone().requires_grad_()
    x_mb = x.clone().requires_grad_()

    ref = _out(block, x_hf)
    res = layer(x_mb)
    assert res.out.dtype == dtype
    errs = [_rel(res.out, ref)]
    assert errs[0] <= TOL[dtype]

    logits, experts = _hf_routing(block, x, case.k)
    # The router logits are the same F.linear (cast to the routing dtype, which is
    # float32 where HF routes in float32 even in a float64 model).
    torch.testing.assert_close(res.routing.scores, logits.to(res.routing.scores.dtype))
    assert torch.equal(res.routing.experts.sort(dim=-1).values, experts)
    if skew:
        counts = torch.bincount(res.routing.experts.reshape(-1), minlength=E)
        assert (counts == 0).any(), "the skewed input should leave some expert without token"

    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    (ref * g).sum().backward()
    (res.out * g).sum().backward()
    errs.append(_rel(x_mb.grad, x_hf.grad))
    assert errs[-1] <= TOL[dtype]

    grads = copy.deepcopy(layer)
    with torch.no_grad():
        for p_grad, p in zip(grads.parameters(), layer.parameters(), strict=True):
            p_grad.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    hf_grads = copy.deepcopy(block)
    to_hf(grads, hf_grads)
    for (name, p_hf), (_, g_mapped) in zip(
        block.named_parameters(), hf_grads.named_parameters(), strict=True
    ):
        expected = p_hf.grad if p_hf.grad is not None else torch.zeros_like(p_hf)
        # Experts that got no token have zero gradient on both sides: compare absolutely.
        scale = max(float(expected.norm()), 1.0)
        err = float((g_mapped - expected).norm()) / scale
        assert err <= TOL[dtype], f"{case.name}: gradient of {name} differs by {err:.3g}"
        errs.append(err)
    hf_errors.record(family_of(block).name, dtype, max(errs))


@pytest.fixture(scope="module", autouse=True)
def _write_errors() -> Iterator[None]:
    # With MOEBLOCKS_RECORD_HF_ERRORS=1: the measured errors for the docs (see hf_errors).
    yield
    hf_errors.write()


def test_gpt_oss_returns_the_combine_weights() -> None:
    block = _randomise(_gpt_oss(2), seed=3)
    x = torch.randn(2, 5, D)
    _, weights = block(x)
    res = from_hf(block)(x)
    order_hf = block.router(x.reshape(-1, D))[2].argsort(dim=-1)
    order_mb = res.routing.experts.argsort(dim=-1)
    torch.testing.assert_close(res.routing.weights.gather(1, order_mb), weights.gather(1, order_hf))


def test_mixtral_k1_weight_is_one() -> None:
    block = _randomise(_mixtral(1), seed=4)
    res = from_hf(block)(torch.randn(3, D))
    assert torch.equal(res.routing.weights, torch.ones(3, 1))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_to_hf_round_trip_is_bitwise(case: Case) -> None:
    block = _randomise(case.make(case.k), seed=5)
    target = _randomise(case.make(case.k), seed=6)  # different weights everywhere
    to_hf(from_hf(block), target)
    for (name, a), (_, b) in zip(
        block.state_dict().items(), target.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), f"{case.name}: {name} not restored bit for bit"


def test_switch_drops_overflow_tokens_like_hf() -> None:
    block = _randomise(_switch(1), seed=7)
    layer = from_hf(block)
    x = _inputs(torch.float32, True, block)  # most tokens want one expert: capacity 3 bites
    res = layer(x)
    assert int(res.routing.num_dropped) > 0
    torch.testing.assert_close(res.out, _out(block, x), rtol=1e-5, atol=1e-6)


def test_deepseek_bias_lives_in_a_frozen_balancer() -> None:
    block = _randomise(_deepseek(3), seed=8)
    layer = from_hf(block)
    assert isinstance(layer.router.balancer, mb.BiasBalancer)
    assert layer.router.balancer.rate == 0.0
    assert torch.equal(layer.router.balancer.bias, block.gate.e_score_correction_bias)


def test_unknown_block_is_rejected_with_the_supported_list() -> None:
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock"):
        from_hf(nn.Linear(2, 2))
    block = _randomise(_mixtral(2), seed=9)
    with pytest.raises(TypeError, match="MoELayer"):
        to_hf(nn.Linear(2, 2), block)  # type: ignore[arg-type]


def test_to_hf_rejects_a_mismatched_layer() -> None:
    block = _randomise(_mixtral(2), seed=10)
    other = from_hf(_randomise(_gpt_oss(2), seed=10))
    with pytest.raises((ValueError, TypeError)):
        to_hf(other, block)
