"""capture_routing on Hugging Face models, swapped and unswapped (HF's routers as oracle).

Tiny random models from transformers' config classes (nothing is downloaded). The
reference for every record is the HF router module itself, called on the input the
block received; the aux-loss recipe is checked against the model's own ``aux_loss``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import hf_models
import pytest
import torch
from hf_models import D, V
from torch import Tensor, nn

import moeblocks as mb
from moeblocks.hf import (
    HFMoEBlock,
    capture_routing,
    family_of,
    hf_load_balance_loss,
    swap_moe_blocks,
)
from moeblocks.inspect import (
    collect_routing,
    run_overlap_probe,
    subtoken_coherence,
    summarise_layer,
)
from moeblocks.inspect.probe import ProbeItem
from moeblocks.losses import LoadBalanceLoss, TokenStats

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS: dict[str, Callable[[], nn.Module]] = {
    "mixtral": hf_models.mixtral,
    "qwen2_moe": hf_models.qwen2,
    "deepseek_v3": hf_models.deepseek,
    "gpt_oss": hf_models.gpt_oss,
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _ids(seed: int = 1, shape: tuple[int, int] = (2, 7)) -> Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def _block_inputs(model: nn.Module) -> tuple[dict[str, list[Tensor]], list]:
    """Pre-hooks storing what every MoE block (HF or swapped) receives, by module name."""
    seen: dict[str, list[Tensor]] = {}
    handles = []
    for name, m in model.named_modules():
        if family_of(m) is not None or isinstance(m, HFMoEBlock):
            store = seen.setdefault(name, [])
            handles.append(m.register_forward_pre_hook(lambda _m, a, s=store: s.append(a[0])))
    return seen, handles


def _hf_decision(router: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(experts, weights) [T, K] from the HF router module, each row sorted by expert."""
    _, weights, experts = router(x.reshape(-1, x.shape[-1]))
    order = experts.argsort(dim=-1)
    return experts.gather(1, order), weights.gather(1, order)


def _sorted(r: mb.Routing) -> tuple[Tensor, Tensor]:
    order = r.experts.argsort(dim=-1)
    return r.experts.gather(1, order), r.weights.gather(1, order)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("swapped", [False, True], ids=["hf", "swapped"])
@pytest.mark.parametrize("name", list(MODELS))
def test_records_equal_the_hf_routers_decisions(name: str, swapped: bool) -> None:
    model = _build(name)
    hf = copy.deepcopy(model)  # its routers are the oracle
    if swapped:
        swap_moe_blocks(model)
    hooks = _hook_count(model)
    inputs, handles = _block_inputs(model)
    with torch.no_grad(), capture_routing(model) as rec:
        for seed in (1, 2, 3):
            model(_ids(seed))
    for h in handles:
        h.remove()
    assert _hook_count(model) == hooks  # capture's hooks are gone
    assert rec.layer_names == list(inputs)
    assert len(inputs) == 2
    for layer, records in rec.routings.items():
        assert len(records) == 3  # one per layer per forward
        family = family_of(hf.get_submodule(layer))
        router = hf.get_submodule(f"{layer}.{family.router_attr}")
        for r, x in zip(records, inputs[layer], strict=True):
            assert r.batch_shape == (2, 7)
            assert r.num_tokens == 14
            experts, weights = _hf_decision(router, x)
            got_experts, got_weights = _sorted(r)
            assert torch.equal(got_experts, experts)
            # fp32: the same formula, reduced in another order (~1e-7 relative).
            torch.testing.assert_close(got_weights, weights.float(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # outside the context nothing is recorded
        model(_ids())
    assert all(len(v) == 3 for v in rec.routings.values())


@pytest.mark.parametrize("swapped", [False, True], ids=["hf", "swapped"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_hf_aux_loss_from_captured_routings(name: str, swapped: bool) -> None:
    model = _build(name)
    if swapped:
        swap_moe_blocks(model)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # padding is left out of HF's aux loss
    for attention_mask in (None, mask):
        with torch.no_grad(), capture_routing(model) as rec:
            out = model(ids, attention_mask=attention_mask, output_router_logits=True)
        routings = rec.last()
        assert len(routings) == 2
        # fp32 sums over the same tokens in another order.
        torch.testing.assert_close(hf_load_balance_loss(routings, attention_mask), out.aux_loss)
        masks = None if attention_mask is None else [attention_mask.reshape(-1).bool()] * 2
        recipe = LoadBalanceLoss(fractions="tokens").from_stats(TokenStats.pooled(routings, masks))
        torch.testing.assert_close(recipe, out.aux_loss)


def test_swapped_records_can_keep_their_graph() -> None:
    model = _build("mixtral")
    swap_moe_blocks(model)
    with capture_routing(model, detach=False) as rec:
        model(_ids())
    hf_load_balance_loss(rec.last()).backward()
    scorer = model.model.layers[0].mlp.layer.router.scorer
    assert scorer.weight_ED.grad is not None
    assert scorer.weight_ED.grad.abs().sum() > 0
    with torch.no_grad(), capture_routing(model) as rec:
        model(_ids())
    assert not rec.last()[0].probs.requires_grad


def test_unswapped_records_follow_the_weights_at_entry() -> None:
    # The router copy is rebuilt each time the context opens, so a weight change between
    # contexts shows up in the records (and the copy shares no tensor with the model).
    model = _build("mixtral")
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad(), capture_routing(model) as rec:
        model(_ids())
        before = rec.last()[0].scores.clone()
        gate.weight.mul_(2)  # changed inside: the copy keeps the weights at entry
        model(_ids())
        assert torch.equal(rec.last()[0].scores, before)
    with torch.no_grad(), capture_routing(model) as rec:
        model(_ids())
    torch.testing.assert_close(rec.last()[0].scores, 2 * before)


def test_records_feed_every_inspect_tool() -> None:
    model = _build("mixtral")
    batches = [_ids(seed, (3, 8)) for seed in (1, 2)]
    words = ["alpha", "beta", "gamma", "delta", "omega"]

    def encode(text: str) -> list[int]:  # a whitespace tokenizer: one id per word
        return [7 + words.index(w) for w in text.split()]

    items = [
        ProbeItem("alpha", "alpha beta", "gamma alpha"),
        ProbeItem("beta", "beta delta", "omega beta"),
    ]
    results = {}
    for swapped in (False, True):
        if swapped:
            swap_moe_blocks(model)
        with torch.no_grad(), capture_routing(model) as rec:
            forward = rec.forward_fn()
            rs = collect_routing(forward, batches)
            probe = run_overlap_probe(forward, encode, items, num_permutations=50)
        assert all(not v for v in rec.routings.values())  # forward_fn took the records
        assert rs.num_layers == 2
        assert rs.num_tokens == 48
        assert rs.seq_len == 8
        summary = summarise_layer(rs.layers[1])
        coherence = subtoken_coherence(rs.layers[1], torch.arange(48) // 2)
        assert coherence.num_pairs == 24
        assert len(probe) == 2
        results[swapped] = (rs.layers[1].experts, summary.saturation, probe[0].observed)
    assert torch.equal(results[False][0], results[True][0])
    assert results[False][1:] == pytest.approx(results[True][1:])


def test_capture_also_reads_plain_moe_layers() -> None:
    layer = mb.MoELayer(mb.Router(mb.LinearScorer(D, 4), 2), mb.TorchDispatcher(),
                        mb.SwiGLUExperts(4, D, 8))  # fmt: skip
    model = nn.Sequential(layer)
    with torch.no_grad(), capture_routing(model) as rec:
        out = model(torch.randn(2, 3, D))
    assert rec.layer_names == ["0"]
    assert torch.equal(rec.routings["0"][0].experts, out.routing.experts)


def test_hooks_are_removed_after_an_error() -> None:
    model = _build("qwen2_moe")
    hooks = _hook_count(model)
    inside = []

    def fail() -> None:
        with capture_routing(model):
            inside.append(_hook_count(model))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert inside == [hooks + 2]
    assert _hook_count(model) == hooks


def test_capture_errors() -> None:
    with (
        pytest.raises(ValueError, match="no MoE layer to capture"),
        capture_routing(nn.Sequential(nn.Linear(4, 4))),
    ):
        pass
    model = _build("mixtral")
    with capture_routing(model) as rec:
        forward = rec.forward_fn(lambda ids: (model(ids), model(ids)))
        with pytest.raises(ValueError, match="ran 2 times in one forward"):
            forward(_ids())
