"""The vocabulary of the family table: how HF blocks store routers, experts, shared experts.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

A row of :data:`moeblocks.hf.families.FAMILIES` names one :class:`RouterForm`, one
:class:`BankLayout` and one :class:`SharedForm`. Each knows how to read its part of an HF
block into a stock moeblocks part (``read``) and how to write it back (``write``), bit for
bit. Nothing here imports transformers: parts are read by attribute name.

Weight layouts (transformers 5.x):

- ``CONCAT``: ``experts.gate_up_proj`` ``[E, 2F, D]`` (gate rows first) and
  ``experts.down_proj`` ``[E, D, F]`` (``nn.Linear`` layouts); moeblocks stores
  ``[E, D, 2F]`` and ``[E, F, D]``. ``CONCAT_CLAMPED`` is the same with
  ``swiglu_limit`` (:class:`~moeblocks.activations.ClampedGLU`).
- ``INTERLEAVED`` (GPT-OSS): ``gate_up_proj`` ``[E, D, 2F]`` with gate and up interleaved
  along the last dim (even columns gate), biases likewise; ``down_proj`` ``[E, F, D]``.
- ``STACKED`` (Llama-4): ``gate_up_proj`` ``[E, D, 2F]`` (gate first), ``down_proj``
  ``[E, F, D]``.
- ``PER_EXPERT`` (Switch Transformers): one ``wi``/``wo`` ``nn.Linear`` pair per expert.

A row may also name a :class:`StructureForm` (norms around the parts: AXK-1's on the
output, Gemma-4's on both branches and on the routed experts' input) and an
:class:`InlineForm` (a decoder layer that holds its MoE part inline, Gemma-4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from moeblocks.activations import (
    GLU,
    ClampedGLU,
    ClampedSwiGLU,
    GatedActivation,
    GatedInDtype,
    SoftCappedSwiGLU,
)
from moeblocks.balancing import BiasBalancer
from moeblocks.capacity import Capacity
from moeblocks.experts import (
    ConcatExperts,
    ConstantExperts,
    ConstantScaledExperts,
    IdentityExperts,
    MLPExperts,
    NormedExperts,
    ScaledExperts,
    SwiGLUExperts,
)
from moeblocks.gating import (
    AlwaysOnTopK,
    GroupLimitedTopK,
    HashSelection,
    NormedScorer,
    Selection,
    SoftCappedScorer,
    SparseMixer,
    TopK,
    WeightPolicy,
)
from moeblocks.latent import LatentProjection
from moeblocks.layer import MoELayer
from moeblocks.norms import RMSNorm
from moeblocks.routers import LinearScorer, ProductKeyScorer, Router
from moeblocks.shared import SharedExperts

__all__ = [
    "AFMOE",
    "ALWAYS_ON_SIGMOID",
    "BLOCK_BIAS_SIGMOID",
    "BRANCH_NORMS",
    "CLASSIFIER_SOFTMAX_BIASED",
    "COHERE2",
    "COHERE2_SHARED",
    "CONCAT",
    "CONCAT_CLAMPED",
    "CONCAT_CLAMPED_AFTER",
    "CONCAT_CLAMPED_LIMIT",
    "CONCAT_CLAMPED_SWIGLU",
    "CONCAT_GLU_FP32",
    "CONCAT_IDENTITY",
    "CONCAT_SOFT_CAPPED",
    "DEEPSEEK",
    "DEEPSEEK_BLOCK_SCALE",
    "DEEPSEEK_SCALED_AFTER",
    "DEEPSEEK_V2",
    "DEEPSEEK_V4",
    "DEEPSEEK_ZERO_FILL",
    "ERGO",
    "ERGO_EXPERTS",
    "ERGO_SHARED",
    "FUSED_CLAMPED_SWIGLU_SHARED",
    "GATED_SHARED_EXPERT",
    "GATE_BIAS_SIGMOID",
    "GEMMA_INLINE",
    "GPT_OSS",
    "HY_V3",
    "INTERLEAVED",
    "JETMOE",
    "JETMOE_EXPERTS",
    "LATENT_MLP",
    "LFM2",
    "LLAMA4",
    "LOGIT_BIAS_SIGMOID",
    "MISTRAL4",
    "MISTRAL_LARGE4",
    "NORMED_DENSE_MLP",
    "NORMED_SOFTMAX",
    "NO_SHARED",
    "OUTPUT_BIAS",
    "OUT_NORM",
    "PER_EXPERT",
    "PER_EXPERT_FC",
    "PLAIN",
    "ROUTER_BIAS_SIGMOID",
    "ROUTER_WEIGHTED_SHARED",
    "SHARED_EXPERT",
    "SHARED_EXPERTS",
    "SHARED_EXPERTS_CLAMPED",
    "SHARED_EXPERTS_CLAMPED_AFTER",
    "SHARED_EXPERTS_CLAMPED_LIMIT",
    "SHARED_EXPERTS_MLP",
    "SHARED_MLP",
    "SIGMOID_TOPK",
    "SOFTMAX",
    "SOFTMAX_FP32_FLAG",
    "SOFTMAX_NORM_FLAG",
    "SOFTMAX_RAW",
    "SOFTMAX_TOPK",
    "SOFTMAX_TOPK_MODEL_DTYPE",
    "SOFT_CAPPED_SIGMOID",
    "STACKED",
    "SWITCH",
    "TOP2_CAPACITY",
    "WG_SOFTMAX",
    "BankLayout",
    "InlineForm",
    "RouterForm",
    "SharedForm",
    "StructureForm",
    "scale_routed",
    "unscale_routed",
]

# transformers' activation classes by name -> moeblocks activation names.
_ACTIVATIONS = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUActivation": "gelu",
    "GELU": "gelu",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",  # the same tanh formula, written out
    "ReLU": "relu",
    "ReLUSquaredActivation": "relu2",
}


def activation_name(act: nn.Module | Callable) -> str:
    """The moeblocks name of a transformers activation module (or of ``F.silu`` itself)."""
    if act is torch.nn.functional.silu:  # LFM2-MoE's experts store the function
        return "silu"
    name = type(act).__name__
    if name == "GELU" and getattr(act, "approximate", "none") == "tanh":
        return "gelu_tanh"
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported expert activation {name}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _like(module: nn.Module, ref: Tensor) -> nn.Module:
    return module.to(device=ref.device, dtype=ref.dtype)


@torch.no_grad()
def copy_into(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)`` after checking that the shapes agree."""
    if dst.shape != src.shape:
        raise ValueError(f"weight shape mismatch: have {tuple(dst.shape)}, got {tuple(src.shape)}")
    dst.copy_(src)


def _check_bank(bank: nn.Module, kind: type, bias: bool, block: nn.Module) -> None:
    """to_hf writes only what the family has: refuse a bank of another kind."""
    name = type(block).__name__
    if not isinstance(bank, kind):
        raise TypeError(
            f"to_hf: a {name} needs a layer whose bank is {kind.__name__}, "
            f"got {type(bank).__name__}"
        )
    if bank.has_bias != bias:
        raise ValueError(f"to_hf: a {name} has {'' if bias else 'no '}expert biases")


# --- expert banks -----------------------------------------------------------------------


@dataclass(frozen=True)
class BankLayout:
    """How a family stores its routed experts (``block.experts``).

    Attributes:
        name: Short name shown in the docs (``"concat"``, ...).
        read: ``experts module -> moeblocks bank`` (weights copied).
        write: ``(bank, experts module) -> None``: writes the bank back in place.
        from_block: ``read`` and ``write`` take the whole block instead of
            ``block.experts`` (a bank built from several of its modules, experts stored
            on the block, or parts around them).
        read_latent: ``block -> LatentProjection or None``: the projection into the
            experts' space around them, if the family has one (NemotronH, MuseSpark).
        write_latent: ``(LatentProjection or None, block) -> None``: writes it back.
    """

    name: str
    read: Callable[[nn.Module], nn.Module]
    write: Callable[[nn.Module, nn.Module], None]
    from_block: bool = False
    read_latent: Callable[[nn.Module], LatentProjection | None] | None = None
    write_latent: Callable[[LatentProjection | None, nn.Module], None] | None = None


def _glu(experts: nn.Module) -> GatedActivation:
    return GLU(activation_name(experts.act_fn))


def _clamped_after(experts: nn.Module) -> GatedActivation:
    # Bailing-Hybrid: a per-layer limit, None (or 0 in the config) for no clamp.
    act = activation_name(experts.act_fn)
    if experts.limit is None:
        return GLU(act)
    return ClampedGLU(act, float(experts.limit), after_activation=True)


def _clamped_glu(experts: nn.Module) -> GatedActivation:
    # These experts apply silu themselves (no act_fn attribute); the limit is the config's.
    return ClampedGLU("silu", float(experts.swiglu_limit))


def _concat_read(
    experts: nn.Module, activation: Callable[[nn.Module], GatedActivation]
) -> SwiGLUExperts:
    E, width, D = experts.gate_up_proj.shape
    bank = SwiGLUExperts(E, D, width // 2, activation=activation(experts))
    _like(bank, experts.gate_up_proj)
    copy_into(bank.w_in_EDF2, experts.gate_up_proj.transpose(1, 2))
    copy_into(bank.w_out_EFD, experts.down_proj.transpose(1, 2))
    return bank


def _concat_write(bank: nn.Module, experts: nn.Module) -> None:
    _check_bank(bank, SwiGLUExperts, False, experts)
    copy_into(experts.gate_up_proj, bank.w_in_EDF2.transpose(1, 2))
    copy_into(experts.down_proj, bank.w_out_EFD.transpose(1, 2))


def _interleaved_read(ex: nn.Module) -> SwiGLUExperts:
    E, D, width = ex.gate_up_proj.shape
    bank = SwiGLUExperts(E, D, width // 2, activation=ClampedSwiGLU(ex.alpha, ex.limit), bias=True)
    _like(bank, ex.gate_up_proj)
    gu, gub = ex.gate_up_proj, ex.gate_up_proj_bias
    copy_into(bank.w_in_EDF2, torch.cat([gu[..., 0::2], gu[..., 1::2]], dim=-1))
    copy_into(bank.b_in_EF2, torch.cat([gub[..., 0::2], gub[..., 1::2]], dim=-1))
    copy_into(bank.w_out_EFD, ex.down_proj)
    copy_into(bank.b_out_ED, ex.down_proj_bias)
    return bank


def _interleaved_write(bank: nn.Module, ex: nn.Module) -> None:
    _check_bank(bank, SwiGLUExperts, True, ex)
    F = bank.hidden
    gate, up = bank.w_in_EDF2[..., :F], bank.w_in_EDF2[..., F:]
    copy_into(ex.gate_up_proj, torch.stack([gate, up], dim=-1).flatten(-2))
    bgate, bup = bank.b_in_EF2[..., :F], bank.b_in_EF2[..., F:]
    copy_into(ex.gate_up_proj_bias, torch.stack([bgate, bup], dim=-1).flatten(-2))
    copy_into(ex.down_proj, bank.w_out_EFD)
    copy_into(ex.down_proj_bias, bank.b_out_ED)


def _stacked_read(ex: nn.Module) -> SwiGLUExperts:
    E, D, width = ex.gate_up_proj.shape
    bank = SwiGLUExperts(E, D, width // 2, activation=_glu(ex))
    _like(bank, ex.gate_up_proj)
    copy_into(bank.w_in_EDF2, ex.gate_up_proj)
    copy_into(bank.w_out_EFD, ex.down_proj)
    return bank


def _stacked_write(bank: nn.Module, ex: nn.Module) -> None:
    _check_bank(bank, SwiGLUExperts, False, ex)
    copy_into(ex.gate_up_proj, bank.w_in_EDF2)
    copy_into(ex.down_proj, bank.w_out_EFD)


def _per_expert(ex: nn.Module) -> list[nn.Module]:
    return [ex[name] for name in sorted(ex.keys(), key=lambda n: int(n.rsplit("_", 1)[1]))]


def _per_expert_read(ex: nn.Module) -> MLPExperts:
    experts = _per_expert(ex)
    F, D = experts[0].wi.weight.shape
    bank = MLPExperts(len(experts), D, F, activation=activation_name(experts[0].act))
    _like(bank, experts[0].wi.weight)
    copy_into(bank.w_in_EDF, torch.stack([m.wi.weight.t() for m in experts]))
    copy_into(bank.w_out_EFD, torch.stack([m.wo.weight.t() for m in experts]))
    return bank


def _per_expert_write(bank: nn.Module, ex: nn.Module) -> None:
    _check_bank(bank, MLPExperts, False, ex)
    for e, expert in enumerate(_per_expert(ex)):
        copy_into(expert.wi.weight, bank.w_in_EDF[e].t())
        copy_into(expert.wo.weight, bank.w_out_EFD[e].t())


CONCAT = BankLayout("concat", partial(_concat_read, activation=_glu), _concat_write)
CONCAT_CLAMPED_AFTER = BankLayout(
    "concat, GLU clamped after the activation",
    partial(_concat_read, activation=_clamped_after),
    _concat_write,
)
CONCAT_CLAMPED = BankLayout(
    "concat, clamped GLU", partial(_concat_read, activation=_clamped_glu), _concat_write
)
INTERLEAVED = BankLayout("interleaved, biases", _interleaved_read, _interleaved_write)
STACKED = BankLayout("stacked", _stacked_read, _stacked_write)
PER_EXPERT = BankLayout("per-expert Linear", _per_expert_read, _per_expert_write)


# --- routers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterForm:
    """How a family's router computes, and where it stores its weights.

    Attributes:
        name: Short name shown in the docs.
        read: ``(router module, block) -> (Router, Capacity or None)``.
        write: ``(Router, router module, block) -> None``: writes the router back in
            place.
        weight_inputs: The combine weight scales the expert's input (Llama-4).
    """

    name: str
    read: Callable[[nn.Module, nn.Module], tuple[Router, Capacity | None]]
    write: Callable[[Router, nn.Module, nn.Module], None]
    weight_inputs: bool = False


def _linear_scorer(weight_ED: Tensor, bias_E: Tensor | None, compute_dtype: str) -> LinearScorer:
    E, D = weight_ED.shape
    scorer = LinearScorer(D, E, bias=bias_E is not None, compute_dtype=compute_dtype)
    _like(scorer, weight_ED)
    copy_into(scorer.weight_ED, weight_ED)
    if bias_E is not None:
        copy_into(scorer.bias_E, bias_E)
    return scorer


def _check_router_bias(router: Router, gate: nn.Module, has: bool) -> None:
    if (router.gate_bias is not None) != has:
        raise ValueError(f"to_hf: a {type(gate).__name__} has {'a' if has else 'no'} router bias")


def _write_weight(router: Router, gate: nn.Module, block: nn.Module) -> None:
    _check_router_bias(router, gate, False)
    copy_into(gate.weight, router.gate_weight)


def _softmax_read(
    gate: nn.Module, block: nn.Module, norm_flag: bool | None, fp32: bool = False
) -> tuple[Router, None]:
    # Mixtral renormalises the top-k probabilities even for k = 1 (the weight is then 1);
    # Qwen-style routers only when norm_topk_prob is set.
    if norm_flag is None:  # Jamba: the raw probabilities
        renormalize = "never"
    else:
        renormalize = "always" if not norm_flag or gate.norm_topk_prob else "never"
    router = Router(
        _linear_scorer(gate.weight, None, "float32" if fp32 else "input"),
        gate.top_k,
        weights=WeightPolicy(renormalize),
        jitter=float(getattr(block, "jitter_noise", 0.0)),
        routing_dtype=torch.float32,  # these routers softmax in float32 in any model dtype
    )
    return router, None


def _deepseek_read(
    gate: nn.Module, block: nn.Module, scale_on_block: bool = False
) -> tuple[Router, None]:
    # scale_on_block: the block multiplies the summed routed output by the factor, which
    # is the same as scaling every combine weight (the sum is linear).
    scale = (block if scale_on_block else gate).routed_scaling_factor
    E = gate.weight.shape[0]
    selection: Selection = (
        TopK() if gate.num_group == 1 else GroupLimitedTopK(gate.num_group, gate.topk_group)
    )
    # The bias is fixed in a pretrained model; set balancer.rate to train it further.
    balancer = BiasBalancer(E, rate=0.0).to(gate.e_score_correction_bias.device)
    copy_into(balancer.bias, gate.e_score_correction_bias.float())
    router = Router(
        _linear_scorer(gate.weight, None, "float32"),
        gate.top_k,
        scoring="sigmoid",
        selection=selection,
        weights=WeightPolicy(
            "always" if gate.norm_topk_prob else "never",
            scale=float(scale),
            eps=1e-20 if gate.norm_topk_prob else 0.0,
        ),
        balancer=balancer,
        routing_dtype=torch.float32,
    )
    return router, None


def _deepseek_write(router: Router, gate: nn.Module, block: nn.Module) -> None:
    _write_weight(router, gate, block)
    if router.balancer is None:
        raise ValueError(f"to_hf: a {type(gate).__name__} needs a router with a BiasBalancer")
    copy_into(gate.e_score_correction_bias, router.balancer.bias)


def _gpt_oss_read(r: nn.Module, block: nn.Module) -> tuple[Router, None]:
    router = Router(
        _linear_scorer(r.weight, r.bias, "input"),
        r.top_k,
        scoring="softmax_topk",
        weights=WeightPolicy("never"),  # the softmax over the top-k already sums to 1
    )
    return router, None


def _gpt_oss_write(router: Router, r: nn.Module, block: nn.Module) -> None:
    _check_router_bias(router, r, True)
    copy_into(r.weight, router.gate_weight)
    copy_into(r.bias, router.gate_bias)


def _llama4_read(r: nn.Module, block: nn.Module) -> tuple[Router, None]:
    router = Router(
        _linear_scorer(r.weight, None, "input"),
        block.top_k,
        scoring="sigmoid",
        weights=WeightPolicy("never"),
        routing_dtype=torch.float32,  # its sigmoid runs in float32
    )
    return router, None


def _switch_read(r: nn.Module, block: nn.Module) -> tuple[Router, Capacity]:
    cls = r.classifier
    router = Router(
        # The classifier runs in the router dtype (float32) whatever the model dtype.
        _linear_scorer(cls.weight, cls.bias, "float32"),
        1,
        weights=WeightPolicy("never"),
        jitter=float(r.jitter_noise),
        routing_dtype=torch.float32,
    )
    # Switch counts capacity per sequence, in token order.
    return router, Capacity(limit=int(r.expert_capacity), per="sequence")


def _switch_write(router: Router, r: nn.Module, block: nn.Module) -> None:
    cls = r.classifier
    _check_router_bias(router, r, cls.bias is not None)
    copy_into(cls.weight, router.gate_weight)
    if cls.bias is not None:
        copy_into(cls.bias, router.gate_bias)


def _softmax_grouped_read(
    gate: nn.Module, block: nn.Module, fp32: bool, group_score_k: int, always: bool
) -> tuple[Router, None]:
    """DeepSeek-V2 / Mistral-4: softmax over all experts, (group-limited) top-k, scaled."""
    G, topk_group = int(gate.num_group), int(gate.topk_group)
    method = getattr(gate, "topk_method", "group_limited_greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"unsupported topk_method {method!r} of {type(gate).__name__}")
    grouped = method == "group_limited_greedy" and G > 1
    selection: Selection = GroupLimitedTopK(G, topk_group, group_score_k) if grouped else TopK()
    norm = always or bool(getattr(gate, "norm_topk_prob", False))
    router = Router(
        _linear_scorer(gate.weight, None, "float32" if fp32 else "input"),
        gate.top_k,
        selection=selection,
        weights=WeightPolicy(
            "always" if norm else "never",
            scale=float(gate.routed_scaling_factor),
            eps=1e-20 if norm else 0.0,
        ),
        # fp32: logits and softmax in float32; else the softmax runs in the model dtype.
        routing_dtype=torch.float32 if fp32 else None,
    )
    return router, None


def _softmax_topk_read(gate: nn.Module, block: nn.Module, fp32: bool) -> tuple[Router, None]:
    router = Router(
        _linear_scorer(gate.weight, None, "input"),
        gate.top_k,
        scoring="softmax_topk",
        weights=WeightPolicy("never"),  # the softmax over the top-k already sums to 1
        # fp32: Granite casts its logits to float32; Aria's softmax runs in the model dtype.
        routing_dtype=torch.float32 if fp32 else None,
    )
    return router, None


def _sigmoid_biased_read(
    gate: nn.Module,
    block: nn.Module,
    *,
    weight: str,
    bias: str,
    fp32: bool,
    eps: float,
    scale: str | None,
) -> tuple[Router, None]:
    """Sigmoid scores, top-k by score + a selection bias kept on the block, renormalised.

    ``weight``/``bias``: where the router weight (on the router) and the bias (on the
    block) live; ``fp32``: the logits are computed in float32; ``scale``: the router
    attribute holding the routed scaling factor, if any.
    """
    w = _get(gate, weight)
    b = getattr(block, bias)
    balancer = BiasBalancer(w.shape[0], rate=0.0).to(b.device)
    copy_into(balancer.bias, b.detach().float())
    router = Router(
        _linear_scorer(w, None, "float32" if fp32 else "input"),
        gate.top_k,
        scoring="sigmoid",
        weights=WeightPolicy(
            "always", scale=1.0 if scale is None else float(getattr(gate, scale)), eps=eps
        ),
        balancer=balancer,
        jitter=float(getattr(block, "jitter_noise", 0.0)),
        routing_dtype=torch.float32,
    )
    return router, None


def _sigmoid_biased_write(
    router: Router, gate: nn.Module, block: nn.Module, *, weight: str, bias: str
) -> None:
    _check_router_bias(router, gate, False)
    copy_into(_get(gate, weight), router.gate_weight)
    if router.balancer is None:
        raise ValueError(f"to_hf: a {type(block).__name__} needs a router with a BiasBalancer")
    copy_into(getattr(block, bias), router.balancer.bias)


def _get(module: nn.Module, path: str) -> Tensor:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _sigmoid_topk_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """Flint: float32 sigmoid scores, plain top-k, renormalised if norm_topk_prob."""
    router = Router(
        _linear_scorer(gate.weight, None, "float32"),
        gate.top_k,
        scoring="sigmoid",
        weights=WeightPolicy("always" if gate.norm_topk_prob else "never"),
        routing_dtype=torch.float32,
    )
    return router, None


def _lfm2_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """LFM2-MoE: sigmoid in the model dtype, an optional selection bias on the block."""
    balancer = None
    if block.use_expert_bias:
        balancer = BiasBalancer(gate.weight.shape[0], rate=0.0).to(block.expert_bias.device)
        copy_into(balancer.bias, block.expert_bias.float())
    norm = bool(gate.norm_topk_prob)
    router = Router(
        _linear_scorer(gate.weight, None, "input"),
        gate.top_k,
        scoring="sigmoid",
        weights=WeightPolicy(
            "always" if norm else "never",
            scale=float(gate.routed_scaling_factor),
            eps=1e-6 if norm else 0.0,
        ),
        balancer=balancer,
    )
    return router, None


def _lfm2_write(router: Router, gate: nn.Module, block: nn.Module) -> None:
    _write_weight(router, gate, block)
    if (router.balancer is None) == bool(block.use_expert_bias):
        raise ValueError(f"to_hf: the selection bias of a {type(block).__name__} does not match")
    if block.use_expert_bias:
        copy_into(block.expert_bias, router.balancer.bias)


def _logit_bias_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """Kolibri: top-k of float32 logits + a selection bias, gates their sigmoids."""
    balancer = BiasBalancer(gate.weight.shape[0], rate=0.0).to(gate.e_score_correction_bias.device)
    copy_into(balancer.bias, gate.e_score_correction_bias.float())
    router = Router(
        _linear_scorer(gate.weight, None, "float32"),
        gate.top_k,
        scoring="sigmoid_logits",
        weights=WeightPolicy("always" if gate.norm_topk_prob else "never"),
        balancer=balancer,
        routing_dtype=torch.float32,
    )
    return router, None


def _cohere2_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """Cohere2-MoE: top-k of the logits, then a softmax over the k or their sigmoids."""
    if gate.expert_selection_fn == "softmax":
        scoring, renormalize, dtype = "softmax_topk", "never", torch.float32
    elif gate.expert_selection_fn == "sigmoid":
        # The sigmoid is monotone: the top-k of the logits are the top-k of the sigmoids.
        scoring, dtype = "sigmoid", None
        renormalize = "always" if gate.norm_topk_prob else "never"
    else:
        raise ValueError(f"unsupported expert_selection_fn {gate.expert_selection_fn!r}")
    router = Router(
        _linear_scorer(gate.weight, None, "input"),
        gate.top_k,
        scoring=scoring,
        weights=WeightPolicy(renormalize),
        routing_dtype=dtype,
    )
    return router, None


def _wg_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """HunYuan-MoE-V1: an ``nn.Linear`` ``wg``, softmax in float32, renormalised."""
    router = Router(
        _linear_scorer(gate.wg.weight, None, "input"),
        gate.top_k,
        weights=WeightPolicy("always"),
        routing_dtype=torch.float32,
    )
    return router, None


def _wg_write(router: Router, gate: nn.Module, block: nn.Module) -> None:
    _check_router_bias(router, gate, False)
    copy_into(gate.wg.weight, router.gate_weight)


# partial of module-level functions, not closures: a swapped model pickles its rows.
SOFTMAX = RouterForm(
    "softmax, top-k, renormalised", partial(_softmax_read, norm_flag=False), _write_weight
)
SOFTMAX_NORM_FLAG = RouterForm(
    "softmax, top-k, renormalised if norm_topk_prob",
    partial(_softmax_read, norm_flag=True),
    _write_weight,
)
DEEPSEEK_BLOCK_SCALE = RouterForm(
    "sigmoid (float32), selection bias, group-limited top-k, scaled on the block",
    partial(_deepseek_read, scale_on_block=True),
    _deepseek_write,
)
DEEPSEEK = RouterForm(
    "sigmoid (float32), selection bias, group-limited top-k, scaled",
    _deepseek_read,
    _deepseek_write,
)
GPT_OSS = RouterForm("biased linear, top-k, softmax over the k", _gpt_oss_read, _gpt_oss_write)
LLAMA4 = RouterForm(
    "sigmoid of the top-k score, on the expert input", _llama4_read, _write_weight, True
)
SOFTMAX_RAW = RouterForm(
    "softmax, top-k, not renormalised", partial(_softmax_read, norm_flag=None), _write_weight
)
DEEPSEEK_V2 = RouterForm(
    "softmax (float32), group-limited (max) or plain top-k, scaled",
    partial(_softmax_grouped_read, fp32=True, group_score_k=1, always=False),
    _write_weight,
)
MISTRAL4 = RouterForm(
    "softmax, group-limited top-k, scaled",
    partial(_softmax_grouped_read, fp32=False, group_score_k=2, always=False),
    _write_weight,
)
MISTRAL_LARGE4 = RouterForm(
    "softmax (float32), group-limited top-k, renormalised, scaled",
    partial(_softmax_grouped_read, fp32=True, group_score_k=2, always=True),
    _write_weight,
)
SOFTMAX_TOPK = RouterForm(
    "top-k of the logits, softmax (float32) over the k",
    partial(_softmax_topk_read, fp32=True),
    _write_weight,
)
SOFTMAX_TOPK_MODEL_DTYPE = RouterForm(
    "top-k of the logits, softmax over the k",
    partial(_softmax_topk_read, fp32=False),
    _write_weight,
)
BLOCK_BIAS_SIGMOID = RouterForm(
    "sigmoid (float32), selection bias on the block, renormalised",
    partial(
        _sigmoid_biased_read,
        weight="weight",
        bias="e_score_correction_bias",
        fp32=False,
        eps=0.0,
        scale=None,
    ),
    partial(_sigmoid_biased_write, weight="weight", bias="e_score_correction_bias"),
)
HY_V3 = RouterForm(
    "sigmoid (float32), selection bias on the block, renormalised, scaled",
    partial(
        _sigmoid_biased_read,
        weight="weight",
        bias="e_score_correction_bias",
        fp32=True,
        eps=1e-20,
        scale="router_scaling_factor",
    ),
    partial(_sigmoid_biased_write, weight="weight", bias="e_score_correction_bias"),
)
AFMOE = RouterForm(
    "sigmoid (float32) of `gate`, selection bias on the block, renormalised, scaled",
    partial(
        _sigmoid_biased_read,
        weight="gate.weight",
        bias="expert_bias",
        fp32=False,
        eps=1e-20,
        scale="route_scale",
    ),
    partial(_sigmoid_biased_write, weight="gate.weight", bias="expert_bias"),
)
LOGIT_BIAS_SIGMOID = RouterForm(
    "top-k of float32 logits + selection bias, sigmoid gates, renormalised if norm_topk_prob",
    _logit_bias_read,
    _deepseek_write,
)
SIGMOID_TOPK = RouterForm(
    "sigmoid (float32), top-k, renormalised if norm_topk_prob", _sigmoid_topk_read, _write_weight
)
LFM2 = RouterForm(
    "sigmoid, optional selection bias on the block, renormalised if norm_topk_prob, scaled",
    _lfm2_read,
    _lfm2_write,
)
COHERE2 = RouterForm(
    "top-k of the logits, softmax over the k (or their sigmoids)", _cohere2_read, _write_weight
)
SOFTMAX_FP32_FLAG = RouterForm(
    "softmax (float32 logits), top-k, renormalised if norm_topk_prob",
    partial(_softmax_read, norm_flag=True, fp32=True),
    _write_weight,
)
WG_SOFTMAX = RouterForm("softmax (float32) of `wg`, top-k, renormalised", _wg_read, _wg_write)
SWITCH = RouterForm("softmax (float32), top-1, capacity per sequence", _switch_read, _switch_write)


# --- shared experts ---------------------------------------------------------------------


@dataclass(frozen=True)
class SharedForm:
    """How a family stores its shared (always-on) experts.

    Attributes:
        name: Short name shown in the docs (``"—"`` for none).
        read: ``block -> SharedExperts or None``.
        write: ``(SharedExperts or None, block) -> None``.
    """

    name: str
    read: Callable[[nn.Module], SharedExperts | None]
    write: Callable[[SharedExperts | None, nn.Module], None]


def _mlp_act(mlp: nn.Module) -> nn.Module:
    return mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn


def _dense_glu(mlp: nn.Module, clamped: bool | str = False) -> SwiGLUExperts:
    """One-expert bank from an ``nn.Linear`` gate_proj / up_proj / down_proj MLP.

    ``clamped``: True when the MLP clamps gate and up at ``mlp.swiglu_limit`` before
    its activation (GLM-5-Next's shared experts); ``"after"`` when it clamps the
    activated gate at ``mlp.limit`` (Bailing-Hybrid; None: no clamp).
    """
    F, D = mlp.gate_proj.weight.shape
    if any(
        getattr(m, "bias", None) is not None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    ):
        raise ValueError(f"shared expert {type(mlp).__name__} has biases; only bias-free is read")
    act = activation_name(_mlp_act(mlp))
    if clamped == "after":
        after = mlp.limit is not None
        activation = ClampedGLU(act, float(mlp.limit), True) if after else GLU(act)
    else:
        activation = ClampedGLU(act, float(mlp.swiglu_limit)) if clamped else GLU(act)
    bank = SwiGLUExperts(1, D, F, activation=activation)
    _like(bank, mlp.gate_proj.weight)
    copy_into(bank.w_in_EDF2[0], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t())
    copy_into(bank.w_out_EFD[0], mlp.down_proj.weight.t())
    return bank


def _dense_glu_back(shared: SharedExperts | None, mlp: nn.Module) -> None:
    if shared is None or not isinstance(shared.experts, SwiGLUExperts):
        raise ValueError("to_hf: the block has a shared SwiGLU expert, the layer has none")
    bank = shared.experts
    gate_FD, up_FD = bank.w_in_EDF2[0].t().chunk(2, dim=0)
    copy_into(mlp.gate_proj.weight, gate_FD)
    copy_into(mlp.up_proj.weight, up_FD)
    copy_into(mlp.down_proj.weight, bank.w_out_EFD[0].t())


def _ungated_read(block: nn.Module, attr: str, clamped: bool | str) -> SharedExperts:
    return SharedExperts(_dense_glu(getattr(block, attr), clamped))


def _ungated_write(shared: SharedExperts | None, block: nn.Module, attr: str) -> None:
    _dense_glu_back(shared, getattr(block, attr))


def _ungated(attr: str, clamped: bool | str = False) -> SharedForm:
    read = partial(_ungated_read, attr=attr, clamped=clamped)
    write = partial(_ungated_write, attr=attr)
    note = {False: "", True: ", clamped GLU", "after": ", GLU clamped after the activation"}
    return SharedForm(f"ungated `{attr}`{note[clamped]}", read, write)


def _gated_read(block: nn.Module) -> SharedExperts:
    shared = SharedExperts(_dense_glu(block.shared_expert), gate=True)
    _like(shared, block.shared_expert_gate.weight)
    copy_into(shared.gate_D, block.shared_expert_gate.weight[0])
    return shared


def _gated_write(shared: SharedExperts | None, block: nn.Module) -> None:
    _dense_glu_back(shared, block.shared_expert)
    if shared.gate_D is None:
        raise ValueError(f"to_hf: a {type(block).__name__} has a gated shared expert")
    copy_into(block.shared_expert_gate.weight[0], shared.gate_D)


def _none_read(block: nn.Module) -> None:
    return None


def _none_write(shared: SharedExperts | None, block: nn.Module) -> None:
    if shared is not None:
        raise ValueError(f"to_hf: a {type(block).__name__} has no shared experts")


def _cohere2_shared_read(block: nn.Module) -> SharedExperts | None:
    if block.num_shared_experts == 0:
        return None
    if block.shared_expert_combination_strategy != "sum":
        # "average" halves the routed output too: a layer option moeblocks lacks.
        raise ValueError(
            "shared_expert_combination_strategy "
            f"{block.shared_expert_combination_strategy!r} is not supported, only 'sum'"
        )
    return SharedExperts(_dense_glu(block.shared_experts))


def _cohere2_shared_write(shared: SharedExperts | None, block: nn.Module) -> None:
    if block.num_shared_experts == 0:
        _none_write(shared, block)
    else:
        _dense_glu_back(shared, block.shared_experts)


NO_SHARED = SharedForm("—", _none_read, _none_write)
SHARED_EXPERTS = _ungated("shared_experts")
SHARED_EXPERT = _ungated("shared_expert")
SHARED_EXPERTS_CLAMPED = _ungated("shared_experts", clamped=True)
SHARED_MLP = _ungated("shared_mlp")
SHARED_EXPERTS_CLAMPED_AFTER = _ungated("shared_experts", clamped="after")
COHERE2_SHARED = SharedForm(
    "ungated `shared_experts` if any (summed)", _cohere2_shared_read, _cohere2_shared_write
)
GATED_SHARED_EXPERT = SharedForm("σ-gated `shared_expert`", _gated_read, _gated_write)


def compose(
    block: nn.Module,
    router_attr: str,
    form: RouterForm,
    bank: BankLayout,
    shared: SharedForm,
    dispatcher: object,
    *,
    experts_attr: str = "experts",
) -> MoELayer:
    """The :class:`~moeblocks.MoELayer` of one table row, with the block's weights.

    ``experts_attr``: the block's attribute holding the routed experts (``""``: the
    block itself holds them, as Doge's).
    """
    router, capacity = form.read(getattr(block, router_attr), block)
    return MoELayer(
        router,
        dispatcher,
        bank.read(block if bank.from_block or not experts_attr else getattr(block, experts_attr)),
        shared=shared.read(block),
        capacity=capacity,
        weight_inputs=form.weight_inputs,
        latent=None if bank.read_latent is None else bank.read_latent(block),
    )


# --- top-2 gating with capacity (NLLB-MoE, GShard) --------------------------------------


def _check_top2(r: nn.Module) -> None:
    """Refuse the router options that are random or that no stock part computes."""
    name = type(r).__name__
    if r.second_expert_policy != "all":
        raise ValueError(
            f"{name}.second_expert_policy must be 'all' (a deterministic second expert), "
            f"got {r.second_expert_policy!r}"
        )
    if r.batch_prioritized_routing:
        raise ValueError(f"{name}.batch_prioritized_routing must be False, got True")
    if r.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must route in float32 or float64 (router_dtype), got {r.dtype}")
    if not r.moe_eval_capacity_token_fraction > 0:
        raise ValueError(
            f"{name}.moe_eval_capacity_token_fraction must be > 0, "
            f"got {r.moe_eval_capacity_token_fraction}"
        )


def _top2_read(r: nn.Module, block: nn.Module) -> tuple[Router, Capacity]:
    # The published evaluation routing: softmax in float32, the best expert, the best
    # other, gates normalised (after dropping unless configured before), capacity
    # ceil(fraction · T) per expert; the experts' eval output scale (1 - moe_token_dropout,
    # expert output masking) folds into the weights.
    _check_top2(r)
    cls = r.classifier
    keep = 1.0 - float(block.experts.moe_token_dropout)
    # float32 in every NLLB config; float64 only where a float64 model is set so by hand.
    compute = "float32" if r.dtype == torch.float32 else "input"
    router = Router(
        _linear_scorer(cls.weight, cls.bias, compute),
        2,
        weights=WeightPolicy("always", scale=keep),
        routing_dtype=r.dtype,
    )
    # ceil(factor · T · K / E) with factor = fraction · E / K is ceil(fraction · T).
    factor = float(r.moe_eval_capacity_token_fraction) * r.num_experts / 2
    after = not r.normalize_router_prob_before_dropping
    return router, Capacity(factor=factor, renormalize=after)


def _top2_write(router: Router, r: nn.Module, block: nn.Module) -> None:
    cls = r.classifier
    _check_router_bias(router, r, cls.bias is not None)
    copy_into(cls.weight, router.gate_weight)
    if cls.bias is not None:
        copy_into(cls.bias, router.gate_bias)


TOP2_CAPACITY = RouterForm(
    "softmax (float32), top-2, gates normalised after dropping, capacity ⌈fraction·T⌉",
    _top2_read,
    _top2_write,
)


def _fc_experts(ex: nn.Module) -> list[nn.Module]:
    # The container also holds the experts' token dropout: take the experts by name.
    return [ex[f"expert_{e}"] for e in range(ex.num_experts)]


def _fc_read(ex: nn.Module) -> MLPExperts:
    experts = _fc_experts(ex)
    F, D = experts[0].fc1.weight.shape
    bank = MLPExperts(len(experts), D, F, activation=activation_name(experts[0].act), bias=True)
    _like(bank, experts[0].fc1.weight)
    copy_into(bank.w_in_EDF, torch.stack([m.fc1.weight.t() for m in experts]))
    copy_into(bank.b_in_EF, torch.stack([m.fc1.bias for m in experts]))
    copy_into(bank.w_out_EFD, torch.stack([m.fc2.weight.t() for m in experts]))
    copy_into(bank.b_out_ED, torch.stack([m.fc2.bias for m in experts]))
    return bank


def _fc_write(bank: nn.Module, ex: nn.Module) -> None:
    _check_bank(bank, MLPExperts, True, ex)
    for e, expert in enumerate(_fc_experts(ex)):
        copy_into(expert.fc1.weight, bank.w_in_EDF[e].t())
        copy_into(expert.fc1.bias, bank.b_in_EF[e])
        copy_into(expert.fc2.weight, bank.w_out_EFD[e].t())
        copy_into(expert.fc2.bias, bank.b_out_ED[e])


PER_EXPERT_FC = BankLayout("per-expert `fc1`/`fc2` Linear, biases", _fc_read, _fc_write)


# --- ERNIE-4.5, DBRX --------------------------------------------------------------

__all__ += ["DBRX", "ERNIE", "OPTIONAL_SHARED_EXPERTS", "PHIMOE", "SPLIT_ROWS"]


def _ernie_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """ERNIE-4.5: float32 softmax, top-k by probs + the bias of ``gate.moe_statics``.

    The combine weights are the chosen probabilities over their sum floored at
    ``moe_norm_min``.
    """
    stored = gate.moe_statics.e_score_correction_bias
    balancer = BiasBalancer(gate.weight.shape[0], rate=0.0).to(stored.device)
    copy_into(balancer.bias, stored.detach().float().reshape(-1))
    router = Router(
        _linear_scorer(gate.weight, None, "float32"),
        gate.top_k,
        weights=WeightPolicy("always", min_sum=float(gate.norm_min)),
        balancer=balancer,
        routing_dtype=torch.float32,
    )
    return router, None


def _ernie_write(router: Router, gate: nn.Module, block: nn.Module) -> None:
    _write_weight(router, gate, block)
    if router.balancer is None:
        raise ValueError(f"to_hf: a {type(gate).__name__} needs a router with a BiasBalancer")
    stored = gate.moe_statics.e_score_correction_bias
    copy_into(stored, router.balancer.bias.reshape(stored.shape))


ERNIE = RouterForm(
    "softmax (float32), top-k by probs + the bias of `moe_statics`, renormalised "
    "with the sum floored at `moe_norm_min`",
    _ernie_read,
    _ernie_write,
)


def _optional_shared_read(block: nn.Module, attr: str) -> SharedExperts | None:
    mlp = getattr(block, attr)
    return None if mlp is None else SharedExperts(_dense_glu(mlp))


def _optional_shared_write(shared: SharedExperts | None, block: nn.Module, attr: str) -> None:
    if getattr(block, attr) is None:
        _none_write(shared, block)
    else:
        _dense_glu_back(shared, getattr(block, attr))


OPTIONAL_SHARED_EXPERTS = SharedForm(
    "ungated `shared_experts` if any",
    partial(_optional_shared_read, attr="shared_experts"),
    partial(_optional_shared_write, attr="shared_experts"),
)


def _dbrx_read(r: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """DBRX: softmax in the model dtype, top-k, weights over their p-norm (if p is set)."""
    p = block.moe_normalize_expert_weights
    router = Router(
        _linear_scorer(r.layer.weight, None, "input"),
        block.top_k,
        weights=WeightPolicy("never") if p is None else WeightPolicy("always", p=float(p)),
        # HF's jitter also scales the experts' input (in place); this one reaches the router only.
        jitter=float(r.moe_jitter_eps or 0.0),
    )
    return router, None


def _dbrx_write(router: Router, r: nn.Module, block: nn.Module) -> None:
    _check_router_bias(router, r, False)
    copy_into(r.layer.weight, router.gate_weight)


DBRX = RouterForm(
    "softmax of `layer`, top-k, weights over their p-norm (`moe_normalize_expert_weights`)",
    _dbrx_read,
    _dbrx_write,
)


def _split_rows(ex: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """DBRX's ``w1``, ``v1``, ``w2`` (each ``[E·F, D]``) as ``[E, F, D]`` views."""
    mlp = ex.mlp
    shape = (ex.num_experts, ex.ffn_hidden_size, ex.hidden_size)
    return mlp.w1.view(shape), mlp.v1.view(shape), mlp.w2.view(shape)


def _split_read(ex: nn.Module) -> SwiGLUExperts:
    w1_EFD, v1_EFD, w2_EFD = _split_rows(ex)
    E, F, D = w1_EFD.shape
    bank = SwiGLUExperts(E, D, F, activation=GLU(activation_name(ex.mlp.activation_fn)))
    _like(bank, w1_EFD)
    copy_into(bank.w_in_EDF2, torch.cat([w1_EFD, v1_EFD], dim=1).transpose(1, 2))
    copy_into(bank.w_out_EFD, w2_EFD)
    return bank


def _split_write(bank: nn.Module, ex: nn.Module) -> None:
    _check_bank(bank, SwiGLUExperts, False, ex)
    w1_EFD, v1_EFD, w2_EFD = _split_rows(ex)
    F = bank.hidden
    copy_into(w1_EFD, bank.w_in_EDF2[..., :F].transpose(1, 2))
    copy_into(v1_EFD, bank.w_in_EDF2[..., F:].transpose(1, 2))
    copy_into(w2_EFD, bank.w_out_EFD)


SPLIT_ROWS = BankLayout(
    "gate, up and down as `[E·F, D]` rows (`mlp.w1`, `v1`, `w2`)", _split_read, _split_write
)


def _phimoe_read(r: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """PhiMoE: SparseMixer-v2 on the logits of the router (an ``nn.Linear`` itself).

    HF's sparsemixer picks two experts whatever ``top_k`` says, so k is 2 here too.
    """
    router = Router(
        _linear_scorer(r.weight, None, "input"),
        2,
        scoring="softmax_topk",
        selection=SparseMixer(float(r.router_jitter_noise)),
        weights=WeightPolicy("never"),
        # HF's jitter scales the experts' input too (in place, twice); this one reaches
        # the router only.
        jitter=float(r.input_jitter_noise),
    )
    return router, None


PHIMOE = RouterForm(
    "SparseMixer-v2 (top-2, masked softmax per slot; sampled in training)",
    _phimoe_read,
    _write_weight,
)


# Doge: product keys over many rank-1 experts, and a dense MLP on the block itself.


def _doge_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """Doge: product-key scores (halves paired across the batch, as HF), softmax over the k."""
    n = int(block.num_keys)
    if block.num_experts != n * n:
        raise ValueError(
            f"a {type(block).__name__} with num_experts={block.num_experts} routes to the "
            f"first {n * n} (num_keys²) only; only a square number of experts converts"
        )
    scorer = ProductKeyScorer(gate.weight.shape[1], n, pairing="batch")
    _like(scorer, gate.weight)
    copy_into(scorer.weight_KD, gate.weight)
    router = Router(
        scorer,
        block.top_k,
        scoring="softmax_topk",
        # The softmax over the k already sums to 1; HF divides by that sum once more.
        weights=WeightPolicy("always" if block.norm_topk_prob else "never"),
    )
    return router, None


def _doge_write(router: Router, gate: nn.Module, block: nn.Module) -> None:
    copy_into(gate.weight, router.get_parameter("scorer.weight_KD"))


DOGE = RouterForm(
    "product keys of `router_gate` (halves paired across the batch), top-k, softmax over the k",
    _doge_read,
    _doge_write,
)


def _rank_one_read(block: nn.Module) -> MLPExperts:
    down, up = block.down_embed.weight, block.up_embed.weight
    E, D = down.shape
    bank = MLPExperts(E, D, 1, activation=activation_name(block.act_fn))
    _like(bank, down)
    copy_into(bank.w_in_EDF, down.unsqueeze(-1))
    copy_into(bank.w_out_EFD, up.unsqueeze(1))
    return bank


def _rank_one_write(bank: nn.Module, block: nn.Module) -> None:
    _check_bank(bank, MLPExperts, False, block)
    copy_into(block.down_embed.weight, bank.w_in_EDF.squeeze(-1))
    copy_into(block.up_embed.weight, bank.w_out_EFD.squeeze(1))


RANK_ONE = BankLayout(
    "rank-1 experts `act(x·down_e)·up_e` (`down_embed`, `up_embed` on the block)",
    _rank_one_read,
    _rank_one_write,
)


def _block_mlp_read(block: nn.Module) -> SharedExperts:
    return SharedExperts(_dense_glu(block))


def _block_mlp_write(shared: SharedExperts | None, block: nn.Module) -> None:
    _dense_glu_back(shared, block)


BLOCK_MLP = SharedForm(
    "ungated MLP on the block itself (`gate_proj`, `up_proj`, `down_proj`)",
    _block_mlp_read,
    _block_mlp_write,
)

__all__ += ["BLOCK_MLP", "DOGE", "RANK_ONE"]


# --- soft-capped SwiGLU experts, a router with its own selection bias --------------


def _soft_capped_glu(experts: nn.Module) -> GatedActivation:
    # Inkling2's act_fn holds the two caps and runs in float32 whatever the model dtype.
    act = experts.act_fn
    return SoftCappedSwiGLU(
        float(act.gate_softcap.softcap), float(act.up_softcap.softcap), dtype=torch.float32
    )


def _router_bias_sigmoid_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """Inkling2: float32 sigmoid, top-k by score + the router's bias, renormalised, scaled."""
    if type(gate.score_fn).__name__ != "Sigmoid":
        raise ValueError(
            f"a {type(gate).__name__} with scoring {type(gate.score_fn).__name__} is not "
            "supported, only sigmoid"
        )
    balancer = BiasBalancer(gate.weight.shape[0], rate=0.0).to(gate.e_score_correction_bias.device)
    copy_into(balancer.bias, gate.e_score_correction_bias.float())
    router = Router(
        _linear_scorer(gate.weight, None, "float32"),
        gate.top_k,
        scoring="sigmoid",
        weights=WeightPolicy("always", scale=float(gate.routed_scaling_factor), eps=1e-20),
        balancer=balancer,
        routing_dtype=torch.float32,
    )
    return router, None


CONCAT_SOFT_CAPPED = BankLayout(
    "concat, soft-capped SwiGLU (float32)",
    partial(_concat_read, activation=_soft_capped_glu),
    _concat_write,
)
ROUTER_BIAS_SIGMOID = RouterForm(
    "sigmoid (float32), selection bias on the router, top-k, renormalised, scaled",
    _router_bias_sigmoid_read,
    _deepseek_write,
)


# --- parameter-free (identity) experts beside the FFN experts ---------------------


def _concat_identity_read(experts: nn.Module) -> nn.Module:
    # LongCat-Flash: experts E … E+Z−1 (zero_expert_num, on the config the experts keep)
    # return their input; HF adds weight · x for them beside the FFN experts' output.
    bank = _concat_read(experts, _glu)
    Z = int(experts.config.zero_expert_num or 0)
    return ConcatExperts(bank, IdentityExperts(Z, bank.dim)) if Z else bank


def _concat_identity_write(bank: nn.Module, experts: nn.Module) -> None:
    Z = int(experts.config.zero_expert_num or 0)
    if not Z:
        _concat_write(bank, experts)
        return
    parts = list(bank.banks) if isinstance(bank, ConcatExperts) else [bank]
    if len(parts) != 2 or not (isinstance(parts[1], IdentityExperts) and parts[1].num_experts == Z):
        raise TypeError(
            f"to_hf: a {type(experts).__name__} needs ConcatExperts(SwiGLUExperts, "
            f"IdentityExperts({Z}, D)), got {bank!r}"
        )
    _concat_write(parts[0], experts)


def _classifier_softmax_read(r: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """LongCat-Flash: float32 softmax of `classifier`, selection bias, not renormalised."""
    # HF's forward uses classifier.weight only: a classifier bias (router_bias) is unused.
    w = r.classifier.weight
    balancer = BiasBalancer(w.shape[0], rate=0.0).to(r.e_score_correction_bias.device)
    copy_into(balancer.bias, r.e_score_correction_bias.float())
    router = Router(
        _linear_scorer(w, None, "float32"),
        r.top_k,
        weights=WeightPolicy("never", scale=float(r.routed_scaling_factor)),
        balancer=balancer,
        routing_dtype=torch.float32,
    )
    return router, None


def _classifier_softmax_write(router: Router, r: nn.Module, block: nn.Module) -> None:
    _check_router_bias(router, r, False)
    copy_into(r.classifier.weight, router.gate_weight)
    if router.balancer is None:
        raise ValueError(f"to_hf: a {type(r).__name__} needs a router with a BiasBalancer")
    copy_into(r.e_score_correction_bias, router.balancer.bias)


CONCAT_IDENTITY = BankLayout(
    "concat, + identity (zero-computation) experts",
    _concat_identity_read,
    _concat_identity_write,
)
CLASSIFIER_SOFTMAX_BIASED = RouterForm(
    "softmax (float32) of `classifier`, selection bias, top-k, scaled",
    _classifier_softmax_read,
    _classifier_softmax_write,
)


# --- shared experts weighted by the router together with the routed ones -----------


def _router_weighted_shared_read(block: nn.Module) -> ScaledExperts:
    """Inkling: routed experts, then the shared ones, times the router's global scale."""
    routed = _concat_read(block.experts, _glu)
    sh = block.shared_experts
    S, F, D = sh.gate_proj.shape
    shared = SwiGLUExperts(S, D, F, activation=GLU(activation_name(sh.act_fn)))
    _like(shared, sh.gate_proj)
    copy_into(shared.w_in_EDF2, torch.cat([sh.gate_proj, sh.up_proj], dim=1).transpose(1, 2))
    copy_into(shared.w_out_EFD, sh.down_proj.transpose(1, 2))
    bank = ScaledExperts(ConcatExperts(routed, shared))
    # The scale keeps the dtype of HF's global_scale (float32 in a pretrained model).
    bank.scale.data = block.gate.global_scale.detach().reshape(()).clone()
    return bank


def _router_weighted_shared_write(bank: nn.Module, block: nn.Module) -> None:
    scalar = isinstance(bank, ScaledExperts) and not bank.per_expert
    inner = bank.bank if scalar else None
    if not (isinstance(inner, ConcatExperts) and len(inner.banks) == 2):
        raise TypeError(
            f"to_hf: a {type(block).__name__} needs ScaledExperts(ConcatExperts(routed, "
            f"shared)) with one scale, got {type(bank).__name__}"
        )
    routed, shared = inner.banks
    _concat_write(routed, block.experts)
    _check_bank(shared, SwiGLUExperts, False, block.shared_experts)
    sh, F = block.shared_experts, shared.hidden
    w_S2FD = shared.w_in_EDF2.transpose(1, 2)
    copy_into(sh.gate_proj, w_S2FD[:, :F])
    copy_into(sh.up_proj, w_S2FD[:, F:])
    copy_into(sh.down_proj, shared.w_out_EFD.transpose(1, 2))
    copy_into(block.gate.global_scale, bank.scale.reshape(1))


def _always_on_sigmoid_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """Inkling: float32 sigmoids of E + S logits; top-k of the E (+ bias), then the S."""
    E, S = int(gate.num_experts), int(gate.n_shared_experts)
    if S < 1:
        raise ValueError(f"a {type(gate).__name__} needs n_shared_experts >= 1, got {S}")
    balancer = BiasBalancer(E + S, rate=0.0).to(gate.e_score_correction_bias.device)
    # The always-on experts are chosen whatever their key: their bias stays 0.
    copy_into(balancer.bias[:E], gate.e_score_correction_bias.float())
    router = Router(
        _linear_scorer(gate.weight, None, "float32"),
        gate.top_k,
        scoring="sigmoid",
        selection=AlwaysOnTopK(S),
        # σ_j / Σ σ over the k chosen and the S shared (HF: exp(logσ − logsumexp logσ)).
        weights=WeightPolicy("always", scale=float(gate.route_scale)),
        balancer=balancer,
        routing_dtype=torch.float32,
    )
    return router, None


def _always_on_sigmoid_write(router: Router, gate: nn.Module, block: nn.Module) -> None:
    _write_weight(router, gate, block)
    E = int(gate.num_experts)
    if router.balancer is None or router.balancer.num_experts != E + gate.n_shared_experts:
        raise ValueError(f"to_hf: a {type(gate).__name__} needs a router with a BiasBalancer")
    copy_into(gate.e_score_correction_bias, router.balancer.bias[:E])


ROUTER_WEIGHTED_SHARED = BankLayout(
    "concat, + the shared experts weighted by the router, × a learnable scale",
    _router_weighted_shared_read,
    _router_weighted_shared_write,
    from_block=True,
)
ALWAYS_ON_SIGMOID = RouterForm(
    "sigmoid (float32), selection bias, top-k plus the always-on shared experts, "
    "renormalised over both, scaled",
    _always_on_sigmoid_read,
    _always_on_sigmoid_write,
)


# --- the routed output scaled after the experts; more router, bank, shared forms --


def scale_routed(layer: MoELayer, block: nn.Module, attr: str) -> MoELayer:
    """Wrap ``layer``'s bank in :class:`~moeblocks.ConstantScaledExperts` by ``block.<attr>``.

    For blocks that multiply the summed routed output by a factor after the experts, in
    the model dtype (``routed_scaling_factor`` of Laguna, Step-3.7, MiniMax-M3, Beam).
    """
    layer.experts = ConstantScaledExperts(layer.experts, float(getattr(block, attr)))
    return layer


def unscale_routed(layer: MoELayer, block: nn.Module, attr: str) -> nn.Module:
    """The bank in ``layer``'s :class:`~moeblocks.ConstantScaledExperts`, its scale checked."""
    bank, want = layer.experts, float(getattr(block, attr))
    if not isinstance(bank, ConstantScaledExperts) or bank.scale != want:
        raise ValueError(
            f"to_hf: a {type(block).__name__} needs a layer whose bank is ConstantScaledExperts "
            f"with scale {want} (its {attr}), got {bank!r}"
        )
    return bank.experts


def _gate_bias_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """Step-3.7 / MiniMax-M3: as BLOCK_BIAS_SIGMOID, the selection bias on the router."""
    return _sigmoid_biased_read(
        gate, gate, weight="weight", bias="e_score_correction_bias", fp32=False, eps=0.0, scale=None
    )


def _gate_bias_write(router: Router, gate: nn.Module, block: nn.Module) -> None:
    _sigmoid_biased_write(router, gate, gate, weight="weight", bias="e_score_correction_bias")


def _soft_capped_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """Laguna: the same, on logits soft-capped in float32 when its cap is > 0."""
    router, _ = _gate_bias_read(gate, block)
    cap = float(gate.router_logit_softcapping)
    if cap > 0:
        scorer = _linear_scorer(gate.weight, None, "input")
        router = router.with_parts(scorer=SoftCappedScorer(scorer, cap, torch.float32))
    return router, None


def _clamped_swiglu(experts: nn.Module) -> GatedActivation:
    return ClampedSwiGLU(float(experts.swiglu_alpha), float(experts.swiglu_limit))


def _fused_read(block: nn.Module, attr: str) -> SharedExperts:
    """A shared MLP with one fused ``gate_up_proj`` Linear (gate rows first), bias-free."""
    mlp = getattr(block, attr)
    if mlp.gate_up_proj.bias is not None or mlp.down_proj.bias is not None:
        raise ValueError(f"shared expert {type(mlp).__name__} has biases; only bias-free is read")
    width, D = mlp.gate_up_proj.weight.shape
    bank = SwiGLUExperts(1, D, width // 2, activation=_clamped_swiglu(mlp))
    _like(bank, mlp.gate_up_proj.weight)
    copy_into(bank.w_in_EDF2[0], mlp.gate_up_proj.weight.t())
    copy_into(bank.w_out_EFD[0], mlp.down_proj.weight.t())
    return SharedExperts(bank)


def _fused_write(shared: SharedExperts | None, block: nn.Module, attr: str) -> None:
    mlp = getattr(block, attr)
    if shared is None or not isinstance(shared.experts, SwiGLUExperts):
        raise ValueError("to_hf: the block has a shared SwiGLU expert, the layer has none")
    copy_into(mlp.gate_up_proj.weight, shared.experts.w_in_EDF2[0].t())
    copy_into(mlp.down_proj.weight, shared.experts.w_out_EFD[0].t())


GATE_BIAS_SIGMOID = RouterForm(
    "sigmoid (float32), selection bias on the router, renormalised",
    _gate_bias_read,
    _gate_bias_write,
)
SOFT_CAPPED_SIGMOID = RouterForm(
    "soft-capped logits (float32), sigmoid, selection bias, renormalised",
    _soft_capped_read,
    _gate_bias_write,  # the capped scorer exposes its linear scorer's weight
)
CONCAT_CLAMPED_SWIGLU = BankLayout(
    "concat, GPT-OSS clamped SwiGLU",
    partial(_concat_read, activation=_clamped_swiglu),
    _concat_write,
)
FUSED_CLAMPED_SWIGLU_SHARED = SharedForm(
    "ungated fused `shared_experts`, GPT-OSS clamped SwiGLU",
    partial(_fused_read, attr="shared_experts"),
    partial(_fused_write, attr="shared_experts"),
)


def _sqrt_softplus_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """DeepSeek-V4: sqrt-softplus scores in the model dtype, renormalised, scaled.

    Its top-k router adds a selection bias; its hash router (the first layers) takes the
    experts of each token id from a fixed table (:class:`~moeblocks.gating.HashSelection`).
    """
    E = gate.weight.shape[0]
    selection: Selection
    balancer = None
    if hasattr(gate, "tid2eid"):
        V, K = gate.tid2eid.shape
        selection = HashSelection(V, K, E).to(gate.tid2eid.device)
        copy_into(selection.table_VK, gate.tid2eid)
    else:
        selection = TopK()
        balancer = BiasBalancer(E, rate=0.0).to(gate.e_score_correction_bias.device)
        copy_into(balancer.bias, gate.e_score_correction_bias.float())
    router = Router(
        _linear_scorer(gate.weight, None, "input"),
        gate.top_k,
        scoring="sqrt_softplus",
        selection=selection,
        weights=WeightPolicy("always", scale=float(gate.routed_scaling_factor), eps=1e-20),
        balancer=balancer,
    )
    return router, None


def _sqrt_softplus_write(router: Router, gate: nn.Module, block: nn.Module) -> None:
    _write_weight(router, gate, block)
    if hasattr(gate, "tid2eid"):
        if not isinstance(router.selection, HashSelection):
            raise ValueError(f"to_hf: a {type(gate).__name__} needs a HashSelection")
        copy_into(gate.tid2eid, router.selection.table_VK)
    elif router.balancer is None:
        raise ValueError(f"to_hf: a {type(gate).__name__} needs a router with a BiasBalancer")
    else:
        copy_into(gate.e_score_correction_bias, router.balancer.bias)


def _clamped_glu_limit(module: nn.Module) -> GatedActivation:
    # DeepSeek-V4 keeps the clamp limit as `limit` and its activation as `act_fn`.
    return ClampedGLU(activation_name(module.act_fn), float(module.limit))


def _limit_clamped_shared_read(block: nn.Module) -> SharedExperts:
    mlp = block.shared_experts
    bank = _dense_glu(mlp)
    bank.activation = _clamped_glu_limit(mlp)
    return SharedExperts(bank)


DEEPSEEK_V4 = RouterForm(
    "sqrt-softplus, selection bias or token-id hash table, renormalised, scaled",
    _sqrt_softplus_read,
    _sqrt_softplus_write,
)
CONCAT_CLAMPED_LIMIT = BankLayout(
    "concat, clamped GLU", partial(_concat_read, activation=_clamped_glu_limit), _concat_write
)
SHARED_EXPERTS_CLAMPED_LIMIT = SharedForm(
    "ungated `shared_experts`, clamped GLU",
    _limit_clamped_shared_read,
    partial(_ungated_write, attr="shared_experts"),
)


def _deepseek_scaled_after_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """Beam: DeepSeek-V3's router; the block's scale applies after the experts instead."""
    router, _ = _deepseek_read(gate, block, scale_on_block=True)
    router.weights = dataclasses.replace(router.weights, scale=1.0)
    return router, None


def _glu_fp32(experts: nn.Module) -> GatedActivation:
    # Beam evaluates act(gate) · up in float32 inside experts of any dtype.
    return GatedInDtype(GLU(activation_name(experts.act_fn)), torch.float32)


DEEPSEEK_SCALED_AFTER = RouterForm(
    "sigmoid (float32), selection bias, group-limited top-k, unscaled",
    _deepseek_scaled_after_read,
    _deepseek_write,
)
CONCAT_GLU_FP32 = BankLayout(
    "concat, GLU in float32", partial(_concat_read, activation=_glu_fp32), _concat_write
)


# --- layer structure around the experts (JetMoE, NemotronH) -----------------------


def _jetmoe_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """JetMoE: top-k of the float32 logits of ``layer``, softmax over the k."""
    router = Router(
        _linear_scorer(gate.layer.weight, None, "input"),
        gate.top_k,
        scoring="softmax_topk",
        weights=WeightPolicy("never"),  # the softmax over the top-k already sums to 1
        routing_dtype=torch.float32,  # it casts its logits to float32
    )
    return router, None


def _jetmoe_write(router: Router, gate: nn.Module, block: nn.Module) -> None:
    _check_router_bias(router, gate, False)
    copy_into(gate.layer.weight, router.gate_weight)


def _on_block_read(block: nn.Module) -> SwiGLUExperts:
    # input_linear [E, 2F, D] (gate rows first), output_linear [E, D, F]: nn.Linear layouts.
    E, width, D = block.input_linear.weight.shape
    bank = SwiGLUExperts(E, D, width // 2, activation=GLU(activation_name(block.activation)))
    _like(bank, block.input_linear.weight)
    copy_into(bank.w_in_EDF2, block.input_linear.weight.transpose(1, 2))
    copy_into(bank.w_out_EFD, block.output_linear.weight.transpose(1, 2))
    return bank


def _on_block_write(bank: nn.Module, block: nn.Module) -> None:
    _check_bank(bank, SwiGLUExperts, False, block)
    copy_into(block.input_linear.weight, bank.w_in_EDF2.transpose(1, 2))
    copy_into(block.output_linear.weight, bank.w_out_EFD.transpose(1, 2))


def _relu2_mlp_read(ex: nn.Module) -> MLPExperts:
    """NemotronH: relu² MLP experts ``up_proj [E, F, L]``, ``down_proj [E, L, F]``."""
    E, F, L = ex.up_proj.shape
    bank = MLPExperts(E, L, F, activation=activation_name(ex.act_fn))
    _like(bank, ex.up_proj)
    copy_into(bank.w_in_EDF, ex.up_proj.transpose(1, 2))
    copy_into(bank.w_out_EFD, ex.down_proj.transpose(1, 2))
    return bank


def _relu2_mlp_write(bank: nn.Module, ex: nn.Module) -> None:
    _check_bank(bank, MLPExperts, False, ex)
    copy_into(ex.up_proj, bank.w_in_EDF.transpose(1, 2))
    copy_into(ex.down_proj, bank.w_out_EFD.transpose(1, 2))


def _latent_read(block: nn.Module, down: str, up: str) -> LatentProjection | None:
    """The block's ``down``/``up`` ``nn.Linear`` pair, None if they are Identity."""
    fc_down, fc_up = getattr(block, down), getattr(block, up)
    if isinstance(fc_down, nn.Identity):
        return None
    bias = fc_down.bias is not None
    if (fc_up.bias is not None) != bias:
        raise ValueError(f"{type(block).__name__}: only one of {down}, {up} has a bias")
    latent = LatentProjection(fc_down.in_features, fc_down.out_features, bias=bias)
    _like(latent, fc_down.weight)
    copy_into(latent.w_down_DL, fc_down.weight.t())
    copy_into(latent.w_up_LD, fc_up.weight.t())
    if bias:
        copy_into(latent.b_down_L, fc_down.bias)
        copy_into(latent.b_up_D, fc_up.bias)
    return latent


def _latent_write(latent: LatentProjection | None, block: nn.Module, down: str, up: str) -> None:
    fc_down, fc_up = getattr(block, down), getattr(block, up)
    if isinstance(fc_down, nn.Identity):
        if latent is not None:
            raise ValueError(f"to_hf: this {type(block).__name__} has no latent projection")
        return
    bias = fc_down.bias is not None
    if (
        not isinstance(latent, LatentProjection)
        or latent.norm is not None
        or latent.has_bias != bias
    ):
        raise ValueError(
            f"to_hf: a {type(block).__name__} needs a layer with a LatentProjection "
            f"(bias={bias}, no norm), got {latent!r}"
        )
    copy_into(fc_down.weight, latent.w_down_DL.t())
    copy_into(fc_up.weight, latent.w_up_LD.t())
    if latent.has_bias:
        copy_into(fc_down.bias, latent.b_down_L)
        copy_into(fc_up.bias, latent.b_up_D)


def _dense_mlp_read(block: nn.Module, attr: str) -> SharedExperts:
    """A one-expert :class:`~moeblocks.MLPExperts` from an ``up_proj``/``down_proj`` MLP."""
    mlp = getattr(block, attr)
    F, D = mlp.up_proj.weight.shape
    bias = mlp.up_proj.bias is not None
    bank = MLPExperts(1, D, F, activation=activation_name(mlp.act_fn), bias=bias)
    _like(bank, mlp.up_proj.weight)
    copy_into(bank.w_in_EDF[0], mlp.up_proj.weight.t())
    copy_into(bank.w_out_EFD[0], mlp.down_proj.weight.t())
    if bias:
        copy_into(bank.b_in_EF[0], mlp.up_proj.bias)
        copy_into(bank.b_out_ED[0], mlp.down_proj.bias)
    return SharedExperts(bank)


def _dense_mlp_write(shared: SharedExperts | None, block: nn.Module, attr: str) -> None:
    mlp = getattr(block, attr)
    if shared is None:
        raise ValueError(f"to_hf: a {type(block).__name__} has a shared MLP, the layer has none")
    bank = shared.experts
    _check_bank(bank, MLPExperts, mlp.up_proj.bias is not None, block)
    copy_into(mlp.up_proj.weight, bank.w_in_EDF[0].t())
    copy_into(mlp.down_proj.weight, bank.w_out_EFD[0].t())
    if bank.has_bias:
        copy_into(mlp.up_proj.bias, bank.b_in_EF[0])
        copy_into(mlp.down_proj.bias, bank.b_out_ED[0])


def _out_bias_read(block: nn.Module) -> SharedExperts:
    # A learnable bias added to the layer output: a constant "expert" in the shared slot.
    shared = _like(SharedExperts(ConstantExperts(1, block.bias.shape[0])), block.bias)
    copy_into(shared.experts.value_ED[0], block.bias)
    return shared


def _out_bias_write(shared: SharedExperts | None, block: nn.Module) -> None:
    if shared is None or not isinstance(shared.experts, ConstantExperts):
        raise ValueError(
            f"to_hf: a {type(block).__name__} adds a bias to its output; the layer needs "
            "SharedExperts(ConstantExperts(1, dim))"
        )
    copy_into(block.bias, shared.experts.value_ED[0])


JETMOE = RouterForm(
    "top-k of the logits of `layer`, softmax (float32) over the k", _jetmoe_read, _jetmoe_write
)
JETMOE_EXPERTS = BankLayout(
    "concat, on the block (`input_linear`, `output_linear`)",
    _on_block_read,
    _on_block_write,
    from_block=True,
)
LATENT_MLP = BankLayout(
    "relu² MLP (`up_proj`, `down_proj`), in a latent space if `fc1_latent_proj`",
    _relu2_mlp_read,
    _relu2_mlp_write,
    read_latent=partial(_latent_read, down="fc1_latent_proj", up="fc2_latent_proj"),
    write_latent=partial(_latent_write, down="fc1_latent_proj", up="fc2_latent_proj"),
)
SHARED_EXPERTS_MLP = SharedForm(
    "ungated `shared_experts` MLP",
    partial(_dense_mlp_read, attr="shared_experts"),
    partial(_dense_mlp_write, attr="shared_experts"),
)
OUTPUT_BIAS = SharedForm("a bias on the output (`bias`)", _out_bias_read, _out_bias_write)


# --- norms around the experts (Ergo) -------------------------------------------


def _biased_sigmoid_router(
    scorer: nn.Module, gate: nn.Module, bias: Tensor, scale: float, eps: float
) -> Router:
    """Sigmoid (float32) scores, top-k by score + selection bias, renormalised, scaled."""
    balancer = BiasBalancer(scorer.num_experts, rate=0.0).to(bias.device)
    copy_into(balancer.bias, bias.detach().float())
    return Router(
        scorer,
        gate.top_k,
        scoring="sigmoid",
        weights=WeightPolicy("always", scale=float(scale), eps=eps),
        balancer=balancer,
        routing_dtype=torch.float32,
    )


def _ergo_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """Ergo: float32 logits of ``linear``, sigmoid, selection bias, renormalised, scaled."""
    scorer = _linear_scorer(gate.linear.weight, None, "float32")
    bias, scale = gate.e_score_correction_bias, gate.routed_scaling_factor
    return _biased_sigmoid_router(scorer, gate, bias, scale, 1e-20), None


def _ergo_write(router: Router, gate: nn.Module, block: nn.Module) -> None:
    _check_router_bias(router, gate, False)
    copy_into(gate.linear.weight, router.gate_weight)
    if router.balancer is None:
        raise ValueError(f"to_hf: a {type(gate).__name__} needs a router with a BiasBalancer")
    copy_into(gate.e_score_correction_bias, router.balancer.bias)


def _norm_of(
    hf_norm: nn.Module, weight_dtype: str = "compute", inverse_root: str = "rsqrt"
) -> RMSNorm:
    """An :class:`RMSNorm` with an HF norm's weight and eps (a ``[E, D]`` weight: per expert).

    ``weight_dtype`` (see :class:`~moeblocks.norms.RMSNorm`): ``"input"`` for Llama-style
    norms (``weight · x̂.to(dtype)``), ``"compute"`` for Gemma-style ones
    (``(x̂ · weight.float()).to(dtype)``, with ``inverse_root="pow"``), ``"weight"`` for
    Ergo's expert norms. The eps is ``variance_epsilon`` or ``eps``, whichever it has.
    """
    w = hf_norm.weight
    eps = hf_norm.variance_epsilon if hasattr(hf_norm, "variance_epsilon") else hf_norm.eps
    norm = RMSNorm(
        w.shape[-1],
        float(eps),
        num_experts=w.shape[0] if w.ndim == 2 else None,
        weight_dtype=weight_dtype,
        inverse_root=inverse_root,
    )
    _like(norm, w)
    copy_into(norm.weight, w)
    return norm


def _normed(bank: nn.Module, block: nn.Module) -> NormedExperts:
    if not isinstance(bank, NormedExperts) or not isinstance(bank.norm, RMSNorm):
        raise TypeError(
            f"to_hf: a {type(block).__name__} normalises its experts' outputs; the layer "
            f"needs a NormedExperts bank with an RMSNorm, got {type(bank).__name__}"
        )
    return bank


def _ergo_experts_read(ex: nn.Module) -> NormedExperts:
    """relu² experts ``up_proj [E, D, F]``, ``down_proj [E, F, D]``, a norm per expert."""
    E, D, F = ex.up_proj.shape
    bank = _like(MLPExperts(E, D, F, activation=activation_name(ex.act_fn)), ex.up_proj)
    copy_into(bank.w_in_EDF, ex.up_proj)
    copy_into(bank.w_out_EFD, ex.down_proj)
    # The normalised row (float32) times the weight in its own dtype.
    return NormedExperts(bank, _norm_of(ex.post_expert_norm, "weight"))


def _ergo_experts_write(bank: nn.Module, ex: nn.Module) -> None:
    normed = _normed(bank, ex)
    copy_into(ex.post_expert_norm.weight, normed.norm.weight)
    _check_bank(normed.experts, MLPExperts, False, ex)
    copy_into(ex.up_proj, normed.experts.w_in_EDF)
    copy_into(ex.down_proj, normed.experts.w_out_EFD)


def _ergo_shared_read(block: nn.Module) -> SharedExperts:
    plain = _dense_mlp_read(block, "shared_experts")
    normed = NormedExperts(plain.experts, _norm_of(block.shared_experts.norm))
    return SharedExperts(normed)


def _ergo_shared_write(shared: SharedExperts | None, block: nn.Module) -> None:
    if shared is None:
        raise ValueError(f"to_hf: a {type(block).__name__} has a shared expert, the layer none")
    normed = _normed(shared.experts, block)
    copy_into(block.shared_experts.norm.weight, normed.norm.weight)
    _dense_mlp_write(SharedExperts(normed.experts), block, "shared_experts")


ERGO = RouterForm(
    "sigmoid (float32) of `linear`, selection bias, renormalised, scaled", _ergo_read, _ergo_write
)
ERGO_EXPERTS = BankLayout(
    "relu² MLP (`up_proj`, `down_proj`), an RMS norm per expert",
    _ergo_experts_read,
    _ergo_experts_write,
)
ERGO_SHARED = SharedForm(
    "ungated relu² `shared_experts` MLP, its output RMS-normed",
    _ergo_shared_read,
    _ergo_shared_write,
)


# --- group-limited routing filled with 0, norms around the composition ------------


def _zero_filled_groups_read(gate: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """AXK-2: DeepSeek-V3's router whose dropped groups get key 0, not −inf.

    Without ``n_group`` (AXK-2's light checkpoints) the top-k is plain.
    """
    E = gate.weight.shape[0]
    selection: Selection = (
        TopK()
        if gate.num_group in (None, 1)  # one group keeps every expert: the fill never shows
        else GroupLimitedTopK(int(gate.num_group), int(gate.topk_group), dropped_fill=0.0)
    )
    balancer = BiasBalancer(E, rate=0.0).to(gate.e_score_correction_bias.device)
    copy_into(balancer.bias, gate.e_score_correction_bias.float())
    router = Router(
        _linear_scorer(gate.weight, None, "float32"),
        gate.top_k,
        scoring="sigmoid",
        selection=selection,
        weights=WeightPolicy(
            "always" if gate.norm_topk_prob else "never",
            scale=float(gate.routed_scaling_factor),
            eps=1e-20 if gate.norm_topk_prob else 0.0,
        ),
        balancer=balancer,
        routing_dtype=torch.float32,
    )
    return router, None


DEEPSEEK_ZERO_FILL = RouterForm(
    "sigmoid (float32), selection bias, group-limited top-k (dropped groups at 0), scaled",
    _zero_filled_groups_read,
    _deepseek_write,
)


@dataclass(frozen=True)
class StructureForm:
    """What a family adds around the stock router, bank and shared experts.

    Most families add nothing (:data:`PLAIN`). Others put norms on the layer's output
    (AXK-1) or on each branch and on the experts' input (Gemma-4), passed to
    :class:`~moeblocks.MoELayer` as ``routed_norm`` / ``out_norm`` or wrapped around the
    bank.

    Attributes:
        name: Short name shown in the docs (``"—"`` for none).
        read: ``(layer from the row's forms, block) -> the family's layer``.
        write: ``(layer, block) -> layer``: writes this form's parts back in place and
            returns the layer the row's router, bank and shared forms write back.
    """

    name: str
    read: Callable[[MoELayer, nn.Module], MoELayer]
    write: Callable[[MoELayer, nn.Module], MoELayer]


def _plain_read(layer: MoELayer, block: nn.Module) -> MoELayer:
    return layer


def _plain_write(layer: MoELayer, block: nn.Module) -> MoELayer:
    for name in ("routed_input_norm", "routed_norm", "out_norm"):
        if getattr(layer, name, None) is not None:
            raise ValueError(f"to_hf: a {type(block).__name__} has no {name}")
    return layer


_KEEP: object = object()  # a _relayer argument left as the layer has it


def _relayer(
    layer: MoELayer,
    *,
    experts: object = _KEEP,
    shared: object = _KEEP,
    routed_norm: object = _KEEP,
    out_norm: object = _KEEP,
    routed_input_norm: object = _KEEP,
) -> MoELayer:
    """A layer of ``layer``'s parts (shared, not copied), the given ones replaced."""

    def pick(new: object, old: object) -> object:
        return old if new is _KEEP else new

    return MoELayer(
        layer.router,
        layer.dispatcher,
        pick(experts, layer.experts),
        dict(layer.losses.items()) | dict(layer.plain_losses),
        layer.check_finite,
        shared=pick(shared, layer.shared),
        capacity=layer.capacity,
        weight_inputs=layer.weight_inputs,
        latent=layer.latent,
        routed_norm=pick(routed_norm, layer.routed_norm),
        out_norm=pick(out_norm, layer.out_norm),
        routed_input_norm=pick(routed_input_norm, layer.routed_input_norm),
    ).train(layer.training)


def _out_norm_read(layer: MoELayer, block: nn.Module, attr: str) -> MoELayer:
    return _relayer(layer, out_norm=_norm_of(getattr(block, attr), "input"))


def _out_norm_write(layer: MoELayer, block: nn.Module, attr: str) -> MoELayer:
    norm = layer.out_norm
    if not isinstance(norm, RMSNorm) or norm.weight is None:
        raise ValueError(f"to_hf: a {type(block).__name__} needs a layer with an RMSNorm out_norm")
    copy_into(getattr(block, attr).weight, norm.weight)
    return _relayer(layer, out_norm=None)


PLAIN = StructureForm("—", _plain_read, _plain_write)
OUT_NORM = StructureForm(
    "RMS norm on the output (`post_mlp_layernorm`)",
    partial(_out_norm_read, attr="post_mlp_layernorm"),
    partial(_out_norm_write, attr="post_mlp_layernorm"),
)


# --- decoder-inline MoE (Gemma-4): a normalising router, norms on both branches ---


def _normed_softmax_read(r: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """Gemma-4: ``proj(rms(x) · scale · D^-½)``, softmax (float32), top-k, renormalised.

    Its ``per_expert_scale`` multiplies the combine weights after the renormalisation:
    :data:`BRANCH_NORMS` puts it on the bank (:class:`~moeblocks.experts.ScaledExperts`).
    """
    D = r.proj.weight.shape[1]
    # Gemma's weightless norm (pow), then its scale in the model dtype (Llama's order).
    norm = RMSNorm(D, float(r.norm.variance_epsilon), weight_dtype="input", inverse_root="pow")
    _like(norm, r.scale)
    copy_into(norm.weight, r.scale)
    scorer = NormedScorer(
        _linear_scorer(r.proj.weight, None, "input"), norm, float(r.scalar_root_size)
    )
    router = Router(
        scorer,
        int(r.config.top_k_experts),
        weights=WeightPolicy("always"),
        routing_dtype=torch.float32,  # its softmax runs in float32 in any model dtype
    )
    return router, None


def _normed_softmax_write(router: Router, r: nn.Module, block: nn.Module) -> None:
    # The router protocol names no input norm: find the part in the router's module tree.
    scorer = next((m for m in router.modules() if isinstance(m, NormedScorer)), None)
    if scorer is None or not isinstance(scorer.norm, RMSNorm):
        raise ValueError(f"to_hf: a {type(r).__name__} needs a NormedScorer with an RMSNorm")
    _check_router_bias(router, r, False)
    copy_into(r.proj.weight, router.gate_weight)
    copy_into(r.scale, scorer.norm.weight)


NORMED_SOFTMAX = RouterForm(
    "RMS-normalised input (own scale, × D^-½), softmax (float32), top-k, renormalised",
    _normed_softmax_read,
    _normed_softmax_write,
)


def _normed_dense_read(block: nn.Module, attr: str, pre: str, post: str) -> SharedExperts:
    bank = NormedExperts(
        _dense_glu(getattr(block, attr)),
        _norm_of(getattr(block, post), "compute", "pow"),
        input_norm=_norm_of(getattr(block, pre), "compute", "pow"),
    )
    return SharedExperts(bank)


def _normed_dense_write(
    shared: SharedExperts | None, block: nn.Module, attr: str, pre: str, post: str
) -> None:
    bank = None if shared is None else shared.experts
    if not isinstance(bank, NormedExperts) or bank.input_norm is None or bank.norm is None:
        raise ValueError(
            f"to_hf: a {type(block).__name__} needs shared experts of a NormedExperts "
            "with an input and an output norm"
        )
    _dense_glu_back(SharedExperts(bank.experts), getattr(block, attr))
    copy_into(getattr(block, pre).weight, bank.input_norm.weight)
    copy_into(getattr(block, post).weight, bank.norm.weight)


NORMED_DENSE_MLP = SharedForm(
    "dense `mlp` between `pre_feedforward_layernorm` and `post_feedforward_layernorm_1`",
    partial(
        _normed_dense_read,
        attr="mlp",
        pre="pre_feedforward_layernorm",
        post="post_feedforward_layernorm_1",
    ),
    partial(
        _normed_dense_write,
        attr="mlp",
        pre="pre_feedforward_layernorm",
        post="post_feedforward_layernorm_1",
    ),
)


def _branch_norms_read(layer: MoELayer, block: nn.Module) -> MoELayer:
    scaled = ScaledExperts(layer.experts, per_expert=True)
    _like(scaled, block.router.per_expert_scale)
    copy_into(scaled.scale, block.router.per_expert_scale)
    return _relayer(
        layer,
        experts=scaled,
        routed_input_norm=_norm_of(block.pre_feedforward_layernorm_2, "compute", "pow"),
        routed_norm=_norm_of(block.post_feedforward_layernorm_2, "compute", "pow"),
        out_norm=_norm_of(block.post_feedforward_layernorm, "compute", "pow"),
    )


def _branch_norms_write(layer: MoELayer, block: nn.Module) -> MoELayer:
    bank, norms = layer.experts, (layer.routed_input_norm, layer.routed_norm, layer.out_norm)
    per_expert = isinstance(bank, ScaledExperts) and bank.per_expert
    if not (per_expert and all(isinstance(n, RMSNorm) for n in norms)):
        raise ValueError(
            f"to_hf: a {type(block).__name__} needs a ScaledExperts(per_expert=True) bank "
            "and RMSNorms as "
            "routed_input_norm, routed_norm and out_norm"
        )
    copy_into(block.router.per_expert_scale, bank.scale)
    for name, norm in zip(
        (
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_2",
            "post_feedforward_layernorm",
        ),
        norms,
        strict=True,
    ):
        copy_into(getattr(block, name).weight, norm.weight)
    return _relayer(
        layer, experts=bank.bank, routed_input_norm=None, routed_norm=None, out_norm=None
    )


BRANCH_NORMS = StructureForm(
    "routed experts fed `pre_feedforward_layernorm_2(x)` (the router gets x) and scaled "
    "per expert "
    "(`per_expert_scale`), their sum normed by `post_feedforward_layernorm_2`, the output "
    "by `post_feedforward_layernorm`",
    _branch_norms_read,
    _branch_norms_write,
)


@dataclass(frozen=True)
class InlineForm:
    """Where a decoder layer keeps its MoE part, and how a swap stands in for it.

    The MoE part runs from the residual stream ``x`` to what the layer adds back to it.
    :func:`~moeblocks.hf.swap_moe_blocks` keeps the decoder layer (its attention and its
    forward) and replaces submodules of the MoE part: ``adapter`` becomes the adapter
    that runs the whole converted layer on ``x``, the router becomes a stub, ``zero``
    modules return zeros and ``identity`` modules pass their input through, so that the
    layer's own forward computes ``x + moe(x)``.

    Attributes:
        adapter: The submodule called with the residual ``x`` (after ``identity``
            modules) whose output the layer adds back (Gemma-4: ``experts``).
        zero: Submodules whose output must vanish (the dense branch, now computed by the
            adapter).
        identity: Submodules that must pass their input through (the norms, now computed
            by the adapter).
        records: What the HF router returns for ``output_router_logits``: ``"scores"``
            (the logits) or ``"probs"`` (Gemma-4's softmax).
    """

    adapter: str
    zero: tuple[str, ...]
    identity: tuple[str, ...]
    records: str = "scores"


GEMMA_INLINE = InlineForm(
    "experts",
    ("mlp",),
    (
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm_1",
        "pre_feedforward_layernorm_2",
        "post_feedforward_layernorm_2",
        "post_feedforward_layernorm",
    ),
    records="probs",
)
