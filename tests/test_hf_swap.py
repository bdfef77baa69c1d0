"""swap_moe_blocks / unswap_moe_blocks on whole Hugging Face models (the oracle).

Every model is a tiny random one built from transformers' config classes (nothing is
downloaded). A swapped model must give the same logits, and with
``output_router_logits=True`` the same router logits and the same ``aux_loss``, as the
model before the swap, whether transformers installed its recording hooks before or
after the swap; gradients must flow, and unswapping must restore every weight.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass

import hf_models
import pytest
import torch
from hf_models import D, V
from torch import Tensor, nn

from moeblocks.hf import HFMoEBlock, family_of, swap_moe_blocks, unswap_moe_blocks
from moeblocks.inspect import intervene, knockout

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    seq2seq: bool = False


CASES = [
    Case("mixtral", hf_models.mixtral),
    Case("qwen2_moe", hf_models.qwen2),
    Case("deepseek_v3", hf_models.deepseek),
    Case("gpt_oss", hf_models.gpt_oss),
    Case("llama4", hf_models.llama4),
    Case("switch", hf_models.switch, seq2seq=True),
]


def _build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return case.make().eval()


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding: HF's aux loss leaves these tokens out
    return ids, mask


def _run(case: Case, model: nn.Module, **kwargs: object) -> object:
    ids, mask = _batch()
    if case.seq2seq:
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5], **kwargs)
    return model(input_ids=ids, attention_mask=mask, **kwargs)


def _router_logits(case: Case, out: object) -> tuple[Tensor, ...]:
    if case.seq2seq:
        return (*out.encoder_router_logits, *out.decoder_router_logits)
    return out.router_logits


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# fp32: the two sides sum the K weighted expert outputs in different orders (HF
# index_adds expert by expert, moeblocks sums each token's K copies): ~1e-7 relative.
TOL = 1e-5


@pytest.mark.parametrize("hooked_first", [False, True], ids=["hooks-after", "hooks-before"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_swap_keeps_logits_router_logits_and_aux_loss(case: Case, hooked_first: bool) -> None:
    model = _build(case)
    reference = copy.deepcopy(model)  # never hooked by the swap
    with torch.no_grad():
        ref = _run(case, reference, output_router_logits=True)
        if hooked_first:  # transformers installs its recorders now, on the HF routers
            _run(case, model, output_router_logits=True)
    hooks = _hook_count(model)
    n_blocks = sum(family_of(m) is not None for m in model.modules())

    assert swap_moe_blocks(model) == n_blocks > 0
    assert not any(family_of(m) is not None for m in model.modules())
    assert _hook_count(model) == hooks  # moved to the taps, none added or lost
    with torch.no_grad():
        out = _run(case, model, output_router_logits=True)
    assert _hook_count(model) == _hook_count(reference)  # installed once, never twice

    assert _rel(out.logits, ref.logits) <= TOL
    got, want = _router_logits(case, out), _router_logits(case, ref)
    assert len(got) == len(want) == n_blocks
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        assert g.shape == w.shape
        assert _rel(g, w) <= TOL
    for name in ("aux_loss", "encoder_aux_loss", "decoder_aux_loss", "encoder_z_loss"):
        if getattr(ref, name, None) is not None:
            assert _rel(getattr(out, name), getattr(ref, name)) <= TOL, name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_swapped_model_trains(case: Case) -> None:
    # Train mode, labels and router logits: the task loss plus HF's weighted aux loss.
    model = _build(case).train()
    reference = copy.deepcopy(model)
    ids, _ = _batch()
    labels = ids[:, :5].contiguous() if case.seq2seq else ids
    ref = _run(case, reference, labels=labels, output_router_logits=True)
    ref.loss.backward()
    swap_moe_blocks(model)
    out = _run(case, model, labels=labels, output_router_logits=True)
    out.loss.backward()
    assert _rel(out.loss, ref.loss) <= TOL
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name in ref_params:  # outside the blocks: the gradient passed through them
            assert _rel(p.grad, ref_params[name].grad) <= 1e-4, name
    # The router weights get the gradient of the task loss and of HF's aux loss.
    for adapter in (m for m in model.modules() if isinstance(m, HFMoEBlock)):
        name = next(n for n, m in model.named_modules() if m is adapter)
        family = adapter.family
        hf_router = reference.get_submodule(f"{name}.{family.router_attr}")
        hf_weight = hf_router.classifier.weight if case.seq2seq else hf_router.weight
        grad = adapter.layer.router.scorer.weight_ED.grad
        assert _rel(grad, hf_weight.grad) <= 1e-4


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_unswap_restores_every_weight_and_the_recorders(case: Case) -> None:
    model = _build(case)
    state = copy.deepcopy(model.state_dict())
    swap_moe_blocks(model)
    with torch.no_grad():  # transformers installs its recorders on the taps
        swapped = _run(case, model, output_router_logits=True)
    assert unswap_moe_blocks(model) > 0
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(restored[key], value), key
    with torch.no_grad():  # the recorders moved back to the HF routers
        again = _run(case, model, output_router_logits=True)
    assert len(_router_logits(case, again)) == len(_router_logits(case, swapped))
    assert _rel(again.logits, swapped.logits) <= TOL


def test_taps_are_router_instances_without_weights() -> None:
    model = _build(CASES[0])
    swap_moe_blocks(model)
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    taps = [m.logits_tap for m in model.modules() if isinstance(m, HFMoEBlock)]
    assert len(taps) == 2
    assert all(isinstance(t, MixtralTopKRouter) for t in taps)
    assert type(taps[0]) is type(taps[1])  # one tap class per router class
    assert not any(True for t in taps for _ in t.parameters())
    assert all(t._is_hf_initialized for t in taps)  # transformers' init skips them
    model.initialize_weights()  # and so it runs on a swapped model


def test_swapped_model_pickles_and_deep_copies() -> None:
    model = _build(CASES[0])
    swap_moe_blocks(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # before transformers hooks it (its hooks are local functions)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        want = _run(CASES[0], model, output_router_logits=True)
        twin = copy.deepcopy(model)  # now with transformers' hooks on the taps
        for other in (loaded, twin):
            got = _run(CASES[0], other, output_router_logits=True)
            assert torch.equal(got.logits, want.logits)
            assert torch.equal(got.aux_loss, want.aux_loss)
    assert _hook_count(twin) == _hook_count(model)


def test_swap_in_bf16_records_logits_in_hf_dtype() -> None:
    # Mixtral's router returns logits in the model dtype, DeepSeek-V3's in float32.
    for case in (CASES[0], CASES[2]):
        model = _build(case).to(torch.bfloat16)
        with torch.no_grad():
            want = [t.dtype for t in _run(case, model, output_router_logits=True).router_logits]
            swap_moe_blocks(model)
            got = [t.dtype for t in _run(case, model, output_router_logits=True).router_logits]
        assert got == want
    assert want == [torch.float32, torch.float32]


def test_interventions_work_on_a_swapped_model() -> None:
    model = _build(CASES[0])
    swap_moe_blocks(model)
    layer = model.model.layers[0].mlp.layer
    ids, _ = _batch()
    with torch.no_grad():
        base = model(ids).logits
        with knockout(layer, 1):
            knocked = model(ids).logits
            routing = layer(torch.randn(3, 5, D)).routing
        with intervene(layer, scales={0: 0.0, 2: 0.0}):
            silenced = model(ids).logits
        after = model(ids).logits
    assert not (routing.experts == 1).any()
    assert not torch.allclose(knocked, base)
    assert not torch.allclose(silenced, base)
    assert torch.equal(after, base)  # restored on exit


def test_swap_errors() -> None:
    with pytest.raises(ValueError, match=r"no supported sparse-MoE block.*MixtralSparseMoeBlock"):
        swap_moe_blocks(nn.Sequential(nn.Linear(4, 4)))
    model = _build(CASES[0])
    with pytest.raises(ValueError, match="itself a MixtralSparseMoeBlock"):
        swap_moe_blocks(model.model.layers[0].mlp)
    with pytest.raises(ValueError, match="no swapped block"):
        unswap_moe_blocks(model)
    swap_moe_blocks(model)
    with pytest.raises(ValueError, match="already swapped"):
        swap_moe_blocks(model)
