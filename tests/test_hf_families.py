"""Every row of the family table added for issue 27 against its Hugging Face block.

The nine first families are tested in ``test_hf_convert.py``; the rows here reuse their
parts (router forms, bank layouts, shared forms) under other class names, plus the
clamped GLU of GLM-5-Next and HY-V4. One tiny block per family is built from
transformers' own config class (nothing is downloaded) with random weights and random
non-zero buffers (DeepSeek-style selection biases), then compared with the converted
layer: outputs, router logits, chosen experts, the input gradient and every weight
gradient (mapped back with ``to_hf``, so a weight the mapping misses fails), in fp32 and
fp64, eval and training mode, plain and skewed routing (experts with no token).
Every family's tiny whole model (two layers, its class found by the Spec's config class)
checks swap_moe_blocks (logits, router logits and HF's aux loss kept), capture_routing
(every MoE layer recorded, the same experts before and after the swap) and
unswap_moe_blocks (every weight restored); a Spec says why where none is built.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hf_errors
import pytest
import torch
import transformers
from hf_round_trip import assert_round_trip_bitwise
from torch import Tensor, nn

from moeblocks.hf import FAMILIES, REFUSED, family_of, from_hf, to_hf
from moeblocks.layer import MoELayer

# Tiny blocks gain nothing from intra-op threads; on a busy machine they only wait.
pytestmark = pytest.mark.usefixtures("one_thread")

D, F, E = 16, 8, 8
MIXTRAL = {"hidden_size": D, "intermediate_size": F, "num_local_experts": E}
QWEN = {"hidden_size": D, "moe_intermediate_size": F, "num_experts": E, "num_experts_per_tok": 2}
QWEN_SHARED = {**QWEN, "shared_expert_intermediate_size": 2 * F}
DEEPSEEK = {
    "hidden_size": D,
    "moe_intermediate_size": F,
    "n_routed_experts": E,
    "num_experts_per_tok": 3,
    "n_group": 4,
    "topk_group": 2,
    "n_shared_experts": 2,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
}
DEEPSEEK_BASE = {
    k: v for k, v in DEEPSEEK.items() if k not in ("n_routed_experts", "n_shared_experts")
}
MIXTRAL_NO_E = {"hidden_size": D, "intermediate_size": F}
NO_NORM = {k: v for k, v in DEEPSEEK.items() if k != "norm_topk_prob"}
# Configs that check D against their attention heads.
HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1}
GRANITE = {**MIXTRAL, "num_experts_per_tok": 2}
# DeepSeek-V3's whole model: MoE from layer 0 (its default keeps the first three dense).
MLA_DENSE0 = {"first_k_dense_replace": 0}
# Whole hybrid models: full attention in both layers (their linear-attention layers run
# slow reference kernels here), an MoE in both.
FULL2 = {"layer_types": ["full_attention"] * 2}
SPARSE2 = {"mlp_layer_types": ["sparse"] * 2}
# A limit the N(0, 0.5²) weights cross often, so the clamps are exercised both ways.
CLAMPED = {**DEEPSEEK, "swiglu_limit": 1.0}


@dataclass(frozen=True)
class Spec:
    folder: str  # transformers.models.<folder>.modeling_<folder>
    config: str  # the config class in transformers
    kwargs: dict = field(default_factory=dict)
    init: dict = field(default_factory=dict)  # extra arguments of the block's __init__
    # The tiny whole model (test_swap_and_capture_the_whole_model): its class in the
    # modeling module (default: the *ForCausalLM, else *Model, whose config_class is
    # `config`), config kwargs on top of `kwargs` and MODEL (e.g. layer types that put an
    # MoE block in one of its two layers), or why none is built (listed by a test).
    model: str = ""
    model_kwargs: dict = field(default_factory=dict)
    no_model: str = ""


SPECS = {
    "minimax": Spec("minimax", "MiniMaxConfig", {**MIXTRAL, "num_experts_per_tok": 2}),
    "qwen3_next": Spec(
        "qwen3_next",
        "Qwen3NextConfig",
        {**QWEN_SHARED, "norm_topk_prob": False},
        model_kwargs=FULL2,
    ),
    "qwen4_exp": Spec(
        "qwen4_exp",
        "Qwen4ExpTextConfig",
        {**QWEN_SHARED, "norm_topk_prob": True},
        model_kwargs={"layer_types": ["linear_attention"] * 2},
    ),
    "qwen3_omni_moe_talker": Spec(
        "qwen3_omni_moe", "Qwen3OmniMoeTalkerTextConfig", {**QWEN_SHARED, "num_experts_per_tok": 1}
    ),
    "qwen3_5_moe": Spec("qwen3_5_moe", "Qwen3_5MoeTextConfig", QWEN_SHARED, model_kwargs=FULL2),
    "qwen3_omni_moe_thinker": Spec(
        "qwen3_omni_moe", "Qwen3OmniMoeTextConfig", {**QWEN, "norm_topk_prob": True}
    ),
    "qwen3_vl_moe": Spec(
        "qwen3_vl_moe", "Qwen3VLMoeTextConfig", {**QWEN, "num_experts_per_tok": 3}
    ),
    "mellum": Spec("mellum", "MellumConfig", {**QWEN, "norm_topk_prob": False}),
    "flex_olmo": Spec(
        "flex_olmo",
        "FlexOlmoConfig",
        {"hidden_size": D, "intermediate_size": F, "num_experts": E, "num_experts_per_tok": 2},
    ),
    "deepseek_v32": Spec("deepseek_v32", "DeepseekV32Config", DEEPSEEK, model_kwargs=MLA_DENSE0),
    "dots1": Spec("dots1", "Dots1Config", {**DEEPSEEK, "norm_topk_prob": False}),
    "kimi_linear": Spec(
        "kimi_linear",
        "KimiLinearConfig",
        {**{k: v for k, v in DEEPSEEK.items() if k != "n_routed_experts"}, "num_local_experts": E},
        model_kwargs={**FULL2, **SPARSE2},
    ),
    "glm4_moe_lite": Spec(
        "glm4_moe_lite", "Glm4MoeLiteConfig", {**DEEPSEEK, "n_group": 1, "topk_group": 1}
    ),
    "glm4v_moe": Spec(
        "glm4v_moe",
        "Glm4vMoeTextConfig",
        DEEPSEEK,
        # Its multimodal RoPE sections must cover the tiny rotary half-dim (2).
        model_kwargs={
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, 0],
                "partial_rotary_factor": 0.5,
            }
        },
    ),
    "glm_moe_dsa": Spec("glm_moe_dsa", "GlmMoeDsaConfig", DEEPSEEK, model_kwargs=MLA_DENSE0),
    "solar_open": Spec("solar_open", "SolarOpenConfig", DEEPSEEK),
    "minicpm5_moe": Spec("minicpm5_moe", "MiniCPM5MoeConfig", DEEPSEEK),
    "glm5_next": Spec(
        "glm5_next",
        "Glm5NextTextConfig",
        CLAMPED,
        model_kwargs={**SPARSE2, "layer_types": ["indexed_attention"] * 2, "qk_rope_head_dim": 0},
    ),
    "hy_v4": Spec("hy_v4", "HYV4Config", CLAMPED),
    "hy_v4_vl": Spec(
        "hy_v4_vl",
        "HYV4VLTextConfig",
        CLAMPED,
        # Multimodal RoPE sections summing to the tiny rotary half-dim (2).
        model_kwargs={
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, 0],
            }
        },
    ),
    "deepseek_v2": Spec(
        "deepseek_v2",
        "DeepseekV2Config",
        {**DEEPSEEK, **HEADS, "topk_method": "group_limited_greedy"},
    ),
    "deepseek_ocr2": Spec(
        "deepseek_ocr2",
        "DeepseekOcr2TextConfig",
        {**NO_NORM, **HEADS, "topk_method": "greedy"},
        model_kwargs=SPARSE2,
    ),
    "unlimited_ocr": Spec(
        "unlimited_ocr",
        "UnlimitedOcrTextConfig",
        {**NO_NORM, **HEADS, "topk_method": "group_limited_greedy"},
    ),
    "mistral4": Spec("mistral4", "Mistral4Config", {**DEEPSEEK, "norm_topk_prob": False}),
    "mistral_large4": Spec("mistral_large4", "MistralLarge4TextConfig", NO_NORM),
    "granitemoe": Spec("granitemoe", "GraniteMoeConfig", GRANITE),
    "granitemoe_swa": Spec("granitemoe_swa", "GraniteMoeSWAConfig", GRANITE),
    "granitemoehybrid": Spec(
        "granitemoehybrid",
        "GraniteMoeHybridConfig",
        {**GRANITE, "mamba_n_heads": 2},
        model_kwargs={"layer_types": ["attention"] * 2},
    ),
    "granitemoeshared": Spec("granitemoeshared", "GraniteMoeSharedConfig", GRANITE),
    "jamba": Spec(
        "jamba",
        "JambaConfig",
        {"hidden_size": D, "intermediate_size": F, "num_experts": E, "num_experts_per_tok": 2},
        # Attention and an MoE in every layer (its default: one attention layer in 8).
        model_kwargs={
            "attn_layer_period": 1,
            "attn_layer_offset": 0,
            "expert_layer_period": 1,
            "expert_layer_offset": 0,
        },
    ),
    "minimax_m2": Spec("minimax_m2", "MiniMaxM2Config", {**MIXTRAL, "num_experts_per_tok": 2}),
    "hunyuan_v1_moe": Spec(
        "hunyuan_v1_moe",
        "HunYuanMoEV1Config",
        {"hidden_size": D, "intermediate_size": F, "num_experts": E, "moe_topk": 2},
        model_kwargs={"head_dim": 8},
    ),
    "exaone_moe": Spec(
        "exaone_moe",
        "ExaoneMoeConfig",
        {**DEEPSEEK_BASE, **HEADS, "num_experts": E, "num_shared_experts": 2},
    ),
    "mimo_v2_flash": Spec(
        "mimo_v2_flash", "MiMoV2FlashConfig", {**DEEPSEEK, **HEADS}, model_kwargs=HEADS
    ),
    "flint": Spec(
        "flint",
        "FlintConfig",
        {**QWEN_SHARED, **HEADS, "norm_topk_prob": True},
        model_kwargs={"mlp_only_layers": []},  # its default keeps layers 0 and 1 dense
    ),
    "lara_mini": Spec("lara_mini", "LaraMiniConfig", {**QWEN_SHARED, **HEADS}),
    "lfm2_moe": Spec(
        "lfm2_moe",
        "Lfm2MoeConfig",
        {
            **QWEN,
            **HEADS,
            "use_expert_bias": True,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
        },
        model_kwargs={**FULL2, "num_dense_layers": 0},
    ),
    "hy_v3": Spec(
        "hy_v3",
        "HYV3Config",
        {
            **QWEN,
            **HEADS,
            "num_shared_experts": 2,
            "router_scaling_factor": 2.5,
            # Its float32 combine would round a float64 model's output to float32.
            "enable_moe_fp32_combine": False,
        },
    ),
    "afmoe": Spec(
        "afmoe", "AfmoeConfig", {**QWEN, **HEADS, "num_shared_experts": 2, "route_scale": 2.5}
    ),
    "cohere2_moe": Spec(
        "cohere2_moe",
        "Cohere2MoeConfig",
        {
            **MIXTRAL_NO_E,
            **HEADS,
            "num_experts": E,
            "num_experts_per_tok": 2,
            "num_shared_experts": 1,
            "shared_expert_combination_strategy": "sum",
            "expert_selection_fn": "softmax",
        },
    ),
    "dots3_note": Spec(
        "dots3_note",
        "Dots3NoteTextConfig",
        {
            **DEEPSEEK,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "shared_experts_intermediate_size": F,
        },
    ),
    "aria": Spec(
        "aria",
        "AriaTextConfig",
        {
            **MIXTRAL_NO_E,
            **HEADS,
            "moe_num_experts": E,
            "moe_topk": 2,
            "moe_num_shared_experts": 2,
        },
    ),
    "bailing_hybrid": Spec(
        "bailing_hybrid",
        "BailingHybridConfig",
        {
            **DEEPSEEK,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            # Layer 0 clamps routed and shared experts after the activation.
            "expert_swiglu_limit_list": [1.0, 0.0],
            "share_expert_swiglu_limit_list": [1.0, 0.0],
        },
        {"layer_idx": 0},
        model_kwargs={**FULL2, **SPARSE2},
    ),
    "kolibri1": Spec(
        "kolibri1", "Kolibri1Config", {**QWEN_SHARED, **HEADS, "norm_topk_prob": True}
    ),
    "kolibri1_1": Spec(
        "kolibri1_1",
        "Kolibri1_1Config",
        {**QWEN_SHARED, **HEADS, "index_num_heads": 1},
        model_kwargs={"mlp_only_layers": []},  # its default keeps layers 0 and 1 dense
    ),
    "ernie4_5_moe": Spec(
        "ernie4_5_moe",
        "Ernie4_5_MoeConfig",
        {
            "hidden_size": D,
            "moe_intermediate_size": F,
            "moe_num_experts": E,
            "moe_k": 2,
            "moe_num_shared_experts": 1,
            # The two chosen probabilities sum to 0.27-0.90 on the plain input: a floor
            # of 0.4 (1e-12 in the released config) binds for two tokens of ten.
            "moe_norm_min": 0.4,
        },
    ),
    "ernie4_5_vl_moe": Spec(
        "ernie4_5_vl_moe",
        "Ernie4_5_VLMoeTextConfig",
        {
            "hidden_size": D,
            "moe_intermediate_size": [F, 2 * F],
            "moe_num_experts": E,
            "moe_k": 2,
            "moe_norm_min": 0.4,  # binds for some tokens, as for ernie4_5_moe
        },
        {"intermediate_size": F},
        no_model="its tiny text model's 3-D rotary table needs a head size the tiny shapes "
        "lack; test_hf_families_routing.py swaps both modality blocks inside HF's own "
        "Ernie4_5_VLMoeMoeBlock instead",
    ),
    "step3p7": Spec(
        "step3p7",
        "Step3p7TextConfig",
        {
            **HEADS,
            "hidden_size": D,
            "moe_intermediate_size": F,
            "num_local_experts": E,
            "num_experts_per_tok": 3,
            "share_expert_dim": F,
            "moe_router_scaling_factor": 2.5,
            "num_hidden_layers": 2,
            # Layer 0 clamps routed and shared experts after the activation.
            "swiglu_limits": [1.0, 0.0],
            "swiglu_limits_shared": [1.0, 0.0],
        },
        {"layer_idx": 0},
        model_kwargs={**SPARSE2, "sliding_window": 8},
    ),
    "minimax_m3_vl": Spec(
        "minimax_m3_vl",
        "MiniMaxM3VLTextConfig",
        {
            **HEADS,
            "hidden_size": D,
            "intermediate_size": F,
            "num_local_experts": E,
            "num_experts_per_tok": 2,
            "shared_intermediate_size": 2 * F,
            "routed_scaling_factor": 2.5,
            "swiglu_limit": 1.0,
        },
    ),
    "laguna": Spec(
        "laguna",
        "LagunaConfig",
        {
            **HEADS,
            "hidden_size": D,
            "moe_intermediate_size": F,
            "num_experts": E,
            "num_experts_per_tok": 2,
            "shared_expert_intermediate_size": 2 * F,
            "moe_routed_scaling_factor": 2.5,
            # Logits of N(0, 0.5²) weights reach ±3: a cap of 1 bends most of them.
            "moe_router_logit_softcapping": 1.0,
        },
    ),
    # The top-k layer (layer 1); the hash layer: test_hf_families_router_inputs.py.
    "deepseek_v4": Spec(
        "deepseek_v4",
        "DeepseekV4Config",
        {
            **HEADS,
            "hidden_size": D,
            "intermediate_size": F,
            "num_local_experts": E,
            "num_experts_per_tok": 3,
            "routed_scaling_factor": 2.5,
            "swiglu_limit": 1.0,
            "vocab_size": 64,
            "num_hidden_layers": 2,
            "mlp_layer_types": ["hash_moe", "moe"],
        },
        {"layer_idx": 1},
        no_model="its hash layers route by token id, and this test feeds embeddings: "
        "test_hf_families_router_inputs.py swaps and captures a whole tiny DeepSeek-V4",
    ),
    "beam": Spec(
        "beam",
        "BeamConfig",
        {
            **HEADS,
            **DEEPSEEK_BASE,
            "num_experts": E,
            # Its SiLU runs in float32 inside float64 experts. Torch's float32 SiLU rounds
            # an element in the scalar tail of its vectorised CPU loop (past the last full
            # block of 32 floats on AVX-512) one ulp away from the vector lanes, so with a
            # hidden size that is not a multiple of 32 HF's float64 output moves with the
            # tokens per expert (~5e-10 at F = 8). Real sizes are multiples of 32.
            "moe_intermediate_size": 4 * F,
        },
        model_kwargs=SPARSE2,
    ),
    "nemotron_h": Spec(
        "nemotron_h",
        "NemotronHConfig",
        # A latent space L = 12 < D around the relu² experts; a shared relu² MLP.
        {**DEEPSEEK, "moe_latent_size": 12, "moe_shared_expert_intermediate_size": 2 * F},
    ),
    # their default first layer is dense; AXK-2's attention is indexed (sparse).
    "axk1": Spec("axk1", "AXK1Config", {**DEEPSEEK, **HEADS}, model_kwargs=SPARSE2),
    # Its selection bias is N(0, 0.1²): the zero fill rarely shows here (see test_group_fill.py).
    "axk2": Spec(
        "axk2",
        "AXK2Config",
        {**DEEPSEEK, **HEADS},
        model_kwargs={**SPARSE2, "layer_types": ["indexed_attention"] * 2},
    ),
}
# Rows whose blocks the Spec form cannot build, tested in their own files:
# test_hf_families_fp32_kept.py (float32 parts in a float64 block) and
# test_hf_families_parameter_free.py (a router weight in an nn.Linear `classifier`).
OWN_FILES = {"inkling", "inkling2", "inkling2_loop", "longcat_flash"}
# rows whose router takes more than the hidden states, tested in their own file.
TESTED_APART = {"dots3_note_vision": "test_hf_families_router_inputs.py"}
# Rows outside the Spec form with no tiny whole model, and why.
NO_WHOLE_MODEL = {
    "dots3_note_vision": "a vision tower's MoE, built from a per-layer config; its block "
    "is tested in test_hf_families_router_inputs.py",
}
NAMES = sorted(SPECS)
ROWS = {f.name: f for f in FAMILIES}


@functools.cache
def _block(name: str) -> nn.Module:
    """The family's tiny block, built once: N(0, 0.5²) weights, N(0, 0.1²) buffers, eval."""
    spec = SPECS[name]
    config = getattr(transformers, spec.config)(**spec.kwargs)
    try:
        module = importlib.import_module(
            f"transformers.models.{spec.folder}.modeling_{spec.folder}"
        )
    except ImportError as error:  # an optional dependency of that model is missing
        pytest.skip(f"transformers' {spec.folder} does not import here: {error}")
    block = getattr(module, ROWS[name].block_class)(config, **spec.init)
    g = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for b in block.buffers():  # selection biases: zeros would hide a missed buffer
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return block.eval()


def _fresh(name: str, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(_block(name)).to(dtype)


def _router(block: nn.Module) -> nn.Module:
    return getattr(block, family_of(block).router_attr)


def _route(block: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """HF's (router logits [T, E], chosen experts [T, K]) from the block's own router."""
    router = _router(block)
    name = family_of(block).name
    if name in ("minimax_m2", "hy_v3"):  # their routers take the block's bias
        logits, _, experts = router(tokens, block.e_score_correction_bias)
    elif name == "lfm2_moe":
        logits, _, experts = router(tokens, block.expert_bias)
    elif name == "afmoe":  # [B, S, D] in, its bias
        logits, _, experts = router(tokens[None], block.expert_bias)
    else:
        logits, _, experts = router(tokens)
    return logits, experts


def _inputs(block: nn.Module, dtype: torch.dtype, skew: bool) -> Tensor:
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if skew:
        # Along one router row, most tokens pick the same experts: others get no token.
        router = _router(block)
        holder = getattr(router, "wg", None) or getattr(router, "gate", router)
        weight = holder.weight
        w = weight[3].detach().to(dtype)
        x = 0.1 * x + 4 * w / w.norm()
    return x


def _rel(a: Tensor, b: Tensor, floor: float = 1e-30) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=floor))


# fp32: HF index_adds the K weighted expert outputs expert by expert, moeblocks sums each
# token's K copies, so the sums round differently (~1e-7 relative); 1e-5 is the issue's
# bound. fp64: the same reordering at double precision (~1e-16), bound 1e-10.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _grads_as_hf(layer: MoELayer, block: nn.Module) -> Iterator[tuple[str, Tensor, Tensor]]:
    """(name, HF's gradient, the layer's gradient mapped into HF's layout) per weight."""
    grads = copy.deepcopy(layer)
    with torch.no_grad():
        for p_grad, p in zip(grads.parameters(), layer.parameters(), strict=True):
            p_grad.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    mapped = copy.deepcopy(block)
    to_hf(grads, mapped)
    for (name, p_hf), (_, g) in zip(
        block.named_parameters(), mapped.named_parameters(), strict=True
    ):
        if p_hf.requires_grad:  # AFMoE keeps its selection bias as a frozen parameter
            yield name, (p_hf.grad if p_hf.grad is not None else torch.zeros_like(p_hf)), g


def _compare(name: str, block: nn.Module, layer: MoELayer, x: Tensor) -> float:
    """Assert outputs and gradients agree; return the largest relative error."""
    dtype = x.dtype
    x_hf, x_mb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = block(x_hf)
    ref = (ref[0] if isinstance(ref, tuple) else ref).reshape(x.shape)
    res = layer(x_mb)
    assert res.out.dtype == dtype
    errs = [_rel(res.out, ref)]
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    (ref * g).sum().backward()
    (res.out * g).sum().backward()
    errs.append(_rel(x_mb.grad, x_hf.grad))
    for pname, expected, got in _grads_as_hf(layer, block):
        # Experts that got no token have zero gradient on both sides: floor the norm at 1.
        err = _rel(got, expected, floor=1.0)
        assert err <= TOL[dtype], f"{name}: gradient of {pname} differs by {err:.3g}"
        errs.append(err)
    assert max(errs[:2]) <= TOL[dtype], f"{name}: output/input-gradient errors {errs[:2]}"
    hf_errors.record(name, dtype, max(errs))
    return max(errs)


@pytest.fixture(scope="module", autouse=True)
def _write_errors() -> Iterator[None]:
    yield
    hf_errors.write()


def _check_eval(name: str, block: nn.Module, layer: MoELayer, skew: bool) -> None:
    dtype = next(block.parameters()).dtype
    x = _inputs(block, dtype, skew)
    _compare(name, block, layer, x)
    logits, experts = _route(block, x.reshape(-1, D))
    routing = layer(x).routing
    # The same F.linear; compared in the routing dtype (float32 where HF routes in fp32).
    torch.testing.assert_close(routing.scores, logits.to(routing.scores.dtype), rtol=0, atol=0)
    assert torch.equal(routing.experts.sort(-1).values, experts.sort(-1).values)
    if skew:
        counts = torch.bincount(routing.experts.reshape(-1), minlength=E)
        assert (counts == 0).any(), "the skewed input should leave an expert without token"


# fp32 and fp64, plain and skewed routing (experts with no token): one test per family,
# so the four cases share one copy of the block per dtype and one conversion.
@pytest.mark.parametrize("name", NAMES)
def test_family_matches_hf_in_eval_mode(name: str) -> None:
    for dtype in (torch.float32, torch.float64):
        block = _fresh(name, dtype)
        layer = from_hf(block)
        for skew in (False, True):
            block.zero_grad(set_to_none=True)  # each case compares its own gradients
            layer.zero_grad(set_to_none=True)
            case = f"{name}, {'skewed' if skew else 'plain'}, {dtype}"
            try:
                _check_eval(name, block, layer, skew)
            except AssertionError as error:
                raise AssertionError(f"{case}: {error}") from error


@pytest.mark.parametrize("name", NAMES)
def test_family_matches_hf_in_training_mode(name: str) -> None:
    # None of these blocks has jitter or dropout, so HF's training mode is deterministic.
    block = _fresh(name, torch.float64).train()
    layer = from_hf(block)
    assert layer.training
    _compare(name, block, layer, _inputs(block, torch.float64, skew=False))


@pytest.mark.parametrize("name", NAMES)
def test_family_round_trip_is_bitwise(name: str) -> None:
    block = _block(name)
    assert_round_trip_bitwise(name, block, _fresh(name, torch.float32))


def test_every_new_row_has_a_spec() -> None:
    first = {
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "olmoe",
        "deepseek_v3",
        "glm4_moe",
        "gpt_oss",
        "llama4",
        "switch_transformers",
    }
    # Rows whose HF block is wrong are tested against the published routing in their own
    # file (test_hf_families_nllb.py), not against the block; rows whose blocks need other
    # machinery are tested in their own files too.
    wrong = {f.name for f in FAMILIES if f.hf_block_is_wrong}
    from test_hf_families_routing import NAMES as ROUTING

    # rows whose router the Spec machinery cannot call: test_hf_families_structure.py
    structure = {"jetmoe", "ergo"}
    # decoder-inline rows (Gemma-4, DiffusionGemma): test_hf_families_inline.py
    inline = {f.name for f in FAMILIES if f.inline is not None}
    apart = set(SPECS) | set(TESTED_APART) | structure
    assert set(ROWS) - first - wrong - set(ROUTING) - OWN_FILES - inline == apart


def test_recorded_errors_cover_every_family() -> None:
    # The docs render this file; a row without a measured error would be published blank.
    recorded = hf_errors.load()
    assert set(recorded) == set(ROWS), "rerun with MOEBLOCKS_RECORD_HF_ERRORS=1"
    for name, row in recorded.items():
        assert row["fp32"] <= TOL[torch.float32], name
        assert row["fp64"] <= TOL[torch.float64], name


def test_docs_tables_list_every_family() -> None:
    # The tables of hf.md and architectures.md are rendered by this hook at build time.
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("hf_hook", root / "docs/_hooks/hf_families.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    families = hook.render_families(hf_errors.load())
    refused = hook.render_refused()
    for f in FAMILIES:
        assert f"`{f.block_class}`" in families
        if f.hf_block_is_wrong:
            assert f.hf_block_is_wrong in families, f.name
    assert "not measured" not in families
    for r in REFUSED:
        assert f"`{r.block_class}`" in refused
    for page in hook.PAGES:
        text = (root / "docs" / page).read_text(encoding="utf-8")
        assert hook.FAMILIES_MARKER in text, page
        assert hook.REFUSED_MARKER in text, page


TINY = {
    "vocab_size": 64,
    "hidden_size": D,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}
# Whole models built outside the Spec form: name -> (config class, model class, config
# kwargs on top of TINY). A family listed here is built from this entry, not its Spec.
WHOLE: dict[str, tuple[str, str, dict]] = {
    # relu² experts with per-expert output norms (block test: test_hf_families_structure)
    "ergo": (
        "ErgoConfig",
        "ErgoForCausalLM",
        {
            "moe_intermediate_size": F,
            "shared_intermediate_size": F,
            "first_dense_intermediate_size": F,
            "num_dense_blocks": 0,
            "num_experts": E,
            "num_experts_per_tok": 2,
            "sliding_window": 8,
        },
    ),
    # an output bias; its attention has a router of the same class (unswapped).
    "jetmoe": (
        "JetMoeConfig",
        "JetMoeForCausalLM",
        {
            "intermediate_size": F,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "kv_channels": 8,
        },
    ),
    # the block itself is the recorded module, its logits are [2, T, n] key logits.
    "doge": (
        "DogeConfig",
        "DogeForCausalLM",
        {"intermediate_size": F, "is_moe": True, "num_experts": 16, "num_experts_per_tok": 4},
    ),
    # Rows tested in test_hf_families_routing.py, swapped whole here.
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        {"intermediate_size": F, "num_local_experts": E},
    ),
    "dbrx": (
        "DbrxConfig",
        "DbrxForCausalLM",
        {"ffn_config": {"ffn_hidden_size": F, "moe_num_experts": E, "moe_top_k": 2}},
    ),
}
# Every whole model: two layers, 8 positions; special token ids inside the tiny
# vocabulary; two heads of dim 8 with as many key/value heads (MLA and some validators
# want them equal).
MODEL = {
    "vocab_size": 64,
    "num_hidden_layers": 2,
    "max_position_embeddings": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    # Multi-head latent attention and its sparse-attention indexer, shrunk (their defaults
    # hold millions of weights); other configs keep these as unused attributes.
    "q_lora_rank": 16,
    "kv_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 4,
    "index_n_heads": 2,
    "index_head_dim": 8,
    # Linear-attention (gated delta rule) heads, shrunk likewise.
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
}
# The families whose block tests live elsewhere (the first nine in test_hf_convert.py,
# NLLB-MoE in test_hf_families_nllb.py), for the whole model only.
FIRST = {
    "mixtral": Spec("mixtral", "MixtralConfig", GRANITE),
    "qwen2_moe": Spec("qwen2_moe", "Qwen2MoeConfig", QWEN_SHARED),
    "qwen3_moe": Spec("qwen3_moe", "Qwen3MoeConfig", QWEN),
    "olmoe": Spec("olmoe", "OlmoeConfig", {**MIXTRAL_NO_E, "num_experts": E}),
    "deepseek_v3": Spec("deepseek_v3", "DeepseekV3Config", DEEPSEEK, model_kwargs=MLA_DENSE0),
    "glm4_moe": Spec(
        "glm4_moe", "Glm4MoeConfig", DEEPSEEK, model_kwargs={"first_k_dense_replace": 0}
    ),
    "gpt_oss": Spec("gpt_oss", "GptOssConfig", GRANITE, model_kwargs={"head_dim": 8}),
    "llama4": Spec(
        "llama4",
        "Llama4TextConfig",
        {**MIXTRAL, "num_experts_per_tok": 1},
        model_kwargs={"head_dim": 8, "intermediate_size_mlp": 2 * F},
    ),
    "switch_transformers": Spec(
        "switch_transformers",
        "SwitchTransformersConfig",
        no_model="an encoder-decoder taking token ids: test_hf_swap.py swaps and captures it",
    ),
    "nllb_moe": Spec(
        "nllb_moe",
        "NllbMoeConfig",
        no_model="HF's block is wrong, so its model is no oracle, and swap_moe_blocks "
        "refuses the class (its layers pass the block a padding mask); capture_routing "
        "on its whole model is checked in test_hf_families_nllb.py",
    ),
}
MODEL_SPECS = {**FIRST, **SPECS}


def _model_class(spec: Spec) -> type[nn.Module]:
    """The whole model of a Spec's family: named, or found by its config class."""
    from transformers import PreTrainedModel

    module = importlib.import_module(f"transformers.models.{spec.folder}.modeling_{spec.folder}")
    if spec.model:
        return getattr(module, spec.model)
    config = getattr(transformers, spec.config)
    found = sorted(
        (n for n, c in vars(module).items()
         if isinstance(c, type) and issubclass(c, PreTrainedModel)
         and c.__module__ == module.__name__ and getattr(c, "config_class", None) is config),
        key=lambda n: (not n.endswith("ForCausalLM"), not n.endswith("Model"), n),
    )  # fmt: skip
    assert found, f"no model class of {spec.config} in {module.__name__}: name one in the Spec"
    return getattr(module, found[0])


def _whole_model(name: str) -> nn.Module:
    """The family's tiny whole model, eval mode, MoE weights and buffers random non-zero."""
    torch.manual_seed(0)
    if name in WHOLE:
        config, model_class, kwargs = WHOLE[name]
        model = getattr(transformers, model_class)(getattr(transformers, config)(**TINY, **kwargs))
    else:
        spec = MODEL_SPECS[name]
        config = getattr(transformers, spec.config)(**{**spec.kwargs, **MODEL, **spec.model_kwargs})
        model = _model_class(spec)(config)
    g = torch.Generator().manual_seed(len(name))
    with torch.no_grad():
        for block in (m for m in model.modules() if family_of(m) is not None):
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            for b in block.buffers():
                if b.is_floating_point():
                    b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model.eval()


def _logits(out: object) -> Tensor:
    logits = getattr(out, "logits", None)
    return out.last_hidden_state if logits is None else logits


def _max_rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def test_families_without_a_whole_model_say_why() -> None:
    without = {n: s.no_model for n, s in MODEL_SPECS.items() if s.no_model}
    for name, why in without.items():
        assert why.strip(), name
    print("\nno tiny whole model:", without)
    # Rows tested in their own files swap and capture a whole model there.
    from test_hf_families_fp32_kept import WHOLE as FP32_KEPT
    from test_hf_families_inline import ROWS_OF_WHOLE as INLINE
    from test_hf_families_parameter_free import NAME as PARAMETER_FREE

    inline = {row for rows in INLINE.values() for row in rows}
    assert set(MODEL_SPECS) | set(WHOLE) | set(FP32_KEPT) | {PARAMETER_FREE} | set(
        NO_WHOLE_MODEL
    ) | inline >= set(ROWS)


@pytest.mark.parametrize(
    "name", sorted(n for n, s in MODEL_SPECS.items() if not s.no_model or n in WHOLE)
)
def test_swap_and_capture_the_whole_model(name: str) -> None:
    from moeblocks.hf import capture_routing, swap_moe_blocks, unswap_moe_blocks

    model = _whole_model(name)
    blocks = [n for n, m in model.named_modules() if family_of(m) is not None]
    assert blocks, f"{name}: the tiny model has no MoE block; set layer kwargs in its Spec"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    size = model.config.get_text_config().hidden_size
    x = torch.randn(2, 8, size, generator=torch.Generator().manual_seed(3))

    def run() -> object:  # embeddings in: the talker models take no token ids
        return model(inputs_embeds=x, output_router_logits=True, use_cache=False)

    with torch.no_grad():
        with capture_routing(model) as hf_rec:  # HF's blocks, through router copies
            before = run()
        assert swap_moe_blocks(model) == len(blocks)
        with capture_routing(model) as rec:  # the swapped layers' own records
            after = run()
    # The same blocks summing their K outputs in another order, through two layers:
    # float32 rounding only.
    assert _max_rel(_logits(after), _logits(before)) <= 1e-5, name
    if getattr(before, "router_logits", None):
        for a, b in zip(after.router_logits, before.router_logits, strict=True):
            assert _max_rel(a, b) <= 1e-5, name
    if getattr(before, "aux_loss", None) is not None:  # from the same logits: as above
        torch.testing.assert_close(after.aux_loss, before.aux_loss, rtol=1e-5, atol=1e-6)
    assert list(rec.routings) == list(hf_rec.routings) == blocks
    for layer in blocks:
        (mine,), (theirs,) = rec.routings[layer], hf_rec.routings[layer]
        assert torch.equal(mine.experts.sort(-1).values, theirs.experts.sort(-1).values)
    assert unswap_moe_blocks(model) == len(blocks)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
