"""NLLB-MoE against a float64 reference of its published top-2 routing, not HF's block.

In transformers 5.25 ``NllbMoeSparseMLP`` is no oracle: ``NllbMoeExperts.forward``
one-hots the router's ``[T, E]`` 0/1 top-1 mask as if it held expert ids, so expert 1
runs every token with the token's top-1 gate and expert 0 with its top-2 gate, whatever
the router chose. The router itself (``NllbMoeTop2Router``) computes the published
routing (NLLB-MoE, after fairseq's GShard ``top2gating``): softmax in the router dtype,
the best expert, the best other expert, both gates normalised after dropping, capacity
``ceil(fraction · T)`` per expert in evaluation with every first choice queued before any
second choice; in evaluation the experts' output is scaled by ``1 - moe_token_dropout``
(expert output masking). The reference below is that, token by token, and the converted
layer is checked against it: outputs, router logits and gates (against HF's router too),
chosen and dropped experts, input and weight gradients, fp32 ≤ 1e-5, fp64 ≤ 1e-10, with
capacity that binds (tokens dropped) and that does not, plain and skewed routing.
``test_hf_block_still_ignores_the_router`` records HF's deviation: when transformers fixes
the block it fails, and HF's block should become the oracle here.

Training mode is not compared: HF's expert output masking is a random dropout there, and
its training capacity (``expert_capacity``) differs from the evaluation one the layer uses.
"""

from __future__ import annotations

import copy
import functools
import math

import hf_errors
import pytest
import torch
import transformers
from hf_round_trip import assert_round_trip_bitwise
from test_hf_families import TOL, _grads_as_hf, _rel
from torch import Tensor, nn
from torch.nn import functional as F_
from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

from moeblocks.hf import family_of, from_hf

pytestmark = pytest.mark.usefixtures("one_thread")

D, F, E = 16, 8, 8
DROP = 0.2  # moe_token_dropout: its evaluation scale 0.8 must reach the output


@functools.cache
def _block(fraction: float) -> nn.Module:
    """A tiny block, N(0, 0.5²) weights and router bias (zeros would hide a missed one)."""
    config = transformers.NllbMoeConfig(
        d_model=D,
        num_experts=E,
        router_bias=True,
        moe_token_dropout=DROP,
        moe_eval_capacity_token_fraction=fraction,
    )
    block = NllbMoeSparseMLP(config, ffn_dim=F)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return block.eval()


def _fresh(fraction: float, dtype: torch.dtype) -> nn.Module:
    block = copy.deepcopy(_block(fraction)).to(dtype)
    # HF routes in float32 at most (its config allows 16/32-bit router dtypes); the fp64
    # case routes in float64 on both sides, so the check sees the formula, not rounding.
    block.router.dtype = torch.float32 if dtype == torch.float32 else torch.float64
    return block


def _queue(choice_T: list[int], seen: list[int], capacity: int) -> list[bool]:
    """Whether each token's copy fits its expert, in token order (GShard's cumsum)."""
    kept = []
    for e in choice_T:
        kept.append(seen[e] < capacity)
        seen[e] += 1  # a dropped copy still takes its place in the queue
    return kept


def _reference(block: nn.Module, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(output [T, D] float64, logits [T, E], experts [T, 2], dropped [T, 2]) token by token."""
    r, experts = block.router, block.experts
    dtype = r.dtype
    W, b = r.classifier.weight.to(dtype), r.classifier.bias.to(dtype)
    logits = F_.linear(x_TD.to(dtype), W, b)  # HF's classifier, in the router dtype
    probs = torch.softmax(logits, dim=-1)
    T = x_TD.shape[0]
    first = [int(probs[t].argmax()) for t in range(T)]
    second = [
        int(logits[t].masked_fill(torch.arange(E) == first[t], -math.inf).argmax())
        for t in range(T)
    ]
    capacity = math.ceil(r.moe_eval_capacity_token_fraction * T)
    seen = [0] * E
    kept = list(zip(_queue(first, seen, capacity), _queue(second, seen, capacity), strict=True))
    out = []
    for t in range(T):
        p = [probs[t, first[t]] * kept[t][0], probs[t, second[t]] * kept[t][1]]
        denom = torch.clamp(p[0] + p[1], min=torch.finfo(dtype).eps)
        y = torch.zeros(D, dtype=torch.float64)
        for gate, e in zip(p, (first[t], second[t]), strict=True):
            m = experts[f"expert_{e}"]
            h = F_.relu(x_TD[t].double() @ m.fc1.weight.double().t() + m.fc1.bias.double())
            y = y + (gate / denom).double() * (h @ m.fc2.weight.double().t() + m.fc2.bias.double())
        out.append((1 - DROP) * y)
    chosen = torch.tensor([first, second]).t()
    dropped = ~torch.tensor(kept)
    return torch.stack(out), logits, chosen, dropped


def _inputs(block: nn.Module, dtype: torch.dtype, skew: bool) -> Tensor:
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if skew:  # most tokens pick expert 3 first: other experts get no token
        w = block.router.classifier.weight[3].detach().to(dtype)
        x = 0.1 * x + 4 * w / w.norm()
    return x


@pytest.mark.parametrize("fraction", [1.0, 0.25], ids=["no-drop", "capacity"])
@pytest.mark.parametrize("skew", [False, True], ids=["plain", "skewed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_nllb_matches_the_published_routing(
    fraction: float, skew: bool, dtype: torch.dtype
) -> None:
    block = _fresh(fraction, dtype)
    layer = from_hf(block)
    x = _inputs(block, dtype, skew)
    x_ref, x_mb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, logits, chosen, dropped = _reference(block, x_ref.reshape(-1, D))
    ref = ref.reshape(x.shape)
    res = layer(x_mb)
    routing = res.routing
    assert res.out.dtype == dtype
    # The same linear in the router dtype; the same top-2 and the same drops, exactly.
    torch.testing.assert_close(routing.scores, logits.detach(), rtol=0, atol=0)
    assert torch.equal(routing.experts, chosen)
    assert torch.equal(routing.dropped, dropped)
    if fraction < 1:
        assert dropped.any(), "capacity ceil(0.25 · 10) = 3 should drop copies"
    if skew:
        counts = torch.bincount(routing.experts[~routing.dropped], minlength=E)
        assert (counts == 0).any(), "the skewed input should leave an expert without token"
    # HF's router is right: its combine weights [T, E] are the layer's, before the 0.8
    # (the same gates, normalised in another order: TOL as for the outputs).
    _, hf_probs, hf_logits = block.router(x.reshape(-1, D))
    mine = torch.zeros_like(hf_probs).scatter_add_(
        1, routing.experts, routing.weights.to(hf_probs.dtype) / (1 - DROP)
    )
    assert _rel(mine, hf_probs) <= TOL[dtype]
    assert torch.equal(hf_logits, logits.detach())

    errs = [_rel(res.out, ref)]
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    (ref * g.double()).sum().backward()
    (res.out * g).sum().backward()
    errs.append(_rel(x_mb.grad, x_ref.grad))
    assert max(errs) <= TOL[dtype], errs
    for name, expected, got in _grads_as_hf(layer, block):
        # Experts that got no token have zero gradient on both sides: floor the norm at 1.
        err = _rel(got, expected, floor=1.0)
        assert err <= TOL[dtype], f"gradient of {name} differs by {err:.3g}"
        errs.append(err)
    hf_errors.record("nllb_moe", dtype, max(errs))


def test_hf_block_still_ignores_the_router() -> None:
    block = _fresh(1.0, torch.float64)
    x = _inputs(block, torch.float64, skew=False)
    _, probs, _ = block.router(x.reshape(-1, D))
    top1 = probs.argmax(-1, keepdim=True)
    g1 = probs.gather(1, top1)
    g2 = probs.sum(-1, keepdim=True) - g1
    run = block.experts
    flat = x.reshape(-1, D)
    bug = (1 - DROP) * (g1 * run["expert_1"](flat) + g2 * run["expert_0"](flat))
    hf = block(x).reshape(-1, D)
    # If this fails, transformers has fixed NllbMoeSparseMLP: compare the layer with HF's
    # block (the other tests' reference), and clear Family.hf_block_is_wrong. float64, the
    # same products summed in another order: 1e-12.
    torch.testing.assert_close(hf, bug, rtol=1e-12, atol=1e-12)
    ref = _reference(block, flat)[0]
    # Other experts entirely, not rounding: far above any tolerance.
    assert _rel(hf, ref) > 0.1, "HF's block should differ from the published routing"
    assert family_of(block).hf_block_is_wrong


def test_nllb_round_trip_is_bitwise() -> None:
    block = _block(1.0)
    assert_round_trip_bitwise("nllb_moe", block, copy.deepcopy(block), buffers=False)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("second_expert_policy", "random"),
        ("batch_prioritized_routing", True),
        ("moe_eval_capacity_token_fraction", 0.0),
        ("dtype", torch.bfloat16),
    ],
)
def test_nllb_options_no_part_computes_are_refused(field: str, value: object) -> None:
    block = copy.deepcopy(_block(1.0))
    setattr(block.router, field, value)
    with pytest.raises(ValueError, match=field if field != "dtype" else "router_dtype"):
        from_hf(block)


def test_swap_refuses_nllb_with_the_reason() -> None:
    from moeblocks.hf import swap_moe_blocks

    model = nn.Sequential(copy.deepcopy(_block(1.0)))
    with pytest.raises(ValueError, match="padding mask"):
        swap_moe_blocks(model)
    assert isinstance(model[0], NllbMoeSparseMLP), "nothing is swapped when one is refused"


def test_capture_records_every_sparse_layer_of_the_whole_model() -> None:
    from moeblocks.hf import capture_routing

    config = transformers.NllbMoeConfig(
        vocab_size=64,
        d_model=D,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=F,
        decoder_ffn_dim=F,
        num_experts=E,
        encoder_sparse_step=1,  # every layer sparse (its default: one in four)
        decoder_sparse_step=1,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.NllbMoeForConditionalGeneration(config).eval()
    blocks = {n: m for n, m in model.named_modules() if family_of(m) is not None}
    seen: dict[str, Tensor] = {}
    for name, block in blocks.items():
        block.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0]))
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), capture_routing(model) as rec:
        model(input_ids=ids, decoder_input_ids=ids[:, :5])
        assert list(rec.routings) == list(blocks)
        for name, block in blocks.items():
            (routing,) = rec.routings[name]
            # HF's router (right, unlike its block): the experts its combine weights use.
            _, probs, _ = block.router(seen[name].reshape(-1, D))
            chosen = torch.zeros_like(probs, dtype=torch.bool)
            chosen.scatter_(1, routing.experts, True)
            assert torch.equal(chosen, probs > 0), name


@pytest.fixture(scope="module", autouse=True)
def _write_errors() -> object:
    yield
    hf_errors.write()
