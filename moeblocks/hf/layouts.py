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

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from moeblocks.activations import GLU, ClampedGLU, ClampedSwiGLU, GatedActivation
from moeblocks.balancing import BiasBalancer
from moeblocks.capacity import Capacity
from moeblocks.experts import MLPExperts, NormedExperts, ScaledExperts, SwiGLUExperts
from moeblocks.gating import GroupLimitedTopK, NormedScorer, Selection, TopK, WeightPolicy
from moeblocks.layer import MoELayer
from moeblocks.norms import RMSNorm
from moeblocks.routers import LinearScorer, Router
from moeblocks.shared import SharedExperts

__all__ = [
    "AFMOE",
    "BLOCK_BIAS_SIGMOID",
    "BRANCH_NORMS",
    "COHERE2",
    "COHERE2_SHARED",
    "CONCAT",
    "CONCAT_CLAMPED",
    "CONCAT_CLAMPED_AFTER",
    "DEEPSEEK",
    "DEEPSEEK_BLOCK_SCALE",
    "DEEPSEEK_V2",
    "DEEPSEEK_ZERO_FILL",
    "GATED_SHARED_EXPERT",
    "GEMMA_INLINE",
    "GPT_OSS",
    "HY_V3",
    "INTERLEAVED",
    "LFM2",
    "LLAMA4",
    "LOGIT_BIAS_SIGMOID",
    "MISTRAL4",
    "MISTRAL_LARGE4",
    "NORMED_DENSE_MLP",
    "NORMED_SOFTMAX",
    "NO_SHARED",
    "OUT_NORM",
    "PER_EXPERT",
    "PLAIN",
    "SHARED_EXPERT",
    "SHARED_EXPERTS",
    "SHARED_EXPERTS_CLAMPED",
    "SHARED_EXPERTS_CLAMPED_AFTER",
    "SHARED_MLP",
    "SIGMOID_TOPK",
    "SOFTMAX",
    "SOFTMAX_FP32_FLAG",
    "SOFTMAX_NORM_FLAG",
    "SOFTMAX_RAW",
    "SOFTMAX_TOPK",
    "SOFTMAX_TOPK_MODEL_DTYPE",
    "STACKED",
    "SWITCH",
    "WG_SOFTMAX",
    "BankLayout",
    "InlineForm",
    "RouterForm",
    "SharedForm",
    "StructureForm",
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
    """

    name: str
    read: Callable[[nn.Module], nn.Module]
    write: Callable[[nn.Module, nn.Module], None]


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
) -> MoELayer:
    """The :class:`~moeblocks.MoELayer` of one table row, with the block's weights."""
    router, capacity = form.read(getattr(block, router_attr), block)
    return MoELayer(
        router,
        dispatcher,
        bank.read(block.experts),
        shared=shared.read(block),
        capacity=capacity,
        weight_inputs=form.weight_inputs,
    )


# --- j27b: group-limited routing filled with 0, norms around the composition ------------


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


def _rms_norm(hf_norm: nn.Module, weight_dtype: str = "input") -> RMSNorm:
    """A float32 :class:`~moeblocks.norms.RMSNorm` with the weight of an HF RMS norm.

    ``weight_dtype``: ``"input"`` for Llama-style norms (``weight · x̂.to(dtype)``, with
    rsqrt), ``"compute"`` for Gemma-style ones (``(x̂ · weight.float()).to(dtype)``, with
    ``pow(·, −½)``). An HF norm without a ``weight`` (Gemma's ``with_scale=False``) gives
    a norm without one.
    """
    weight = getattr(hf_norm, "weight", None)
    norm = RMSNorm(
        hf_norm.weight.shape[0] if weight is not None else 1,
        float(hf_norm.variance_epsilon if hasattr(hf_norm, "variance_epsilon") else hf_norm.eps),
        weight=weight is not None,
        weight_dtype=weight_dtype,
        inverse_root="pow" if weight_dtype == "compute" else "rsqrt",
    )
    if weight is not None:
        _like(norm, weight)
        copy_into(norm.weight_D, weight)
    return norm


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
        routed_norm=pick(routed_norm, layer.routed_norm),
        out_norm=pick(out_norm, layer.out_norm),
        routed_input_norm=pick(routed_input_norm, layer.routed_input_norm),
    ).train(layer.training)


def _out_norm_read(layer: MoELayer, block: nn.Module, attr: str) -> MoELayer:
    return _relayer(layer, out_norm=_rms_norm(getattr(block, attr)))


def _out_norm_write(layer: MoELayer, block: nn.Module, attr: str) -> MoELayer:
    norm = layer.out_norm
    if not isinstance(norm, RMSNorm) or norm.weight_D is None:
        raise ValueError(f"to_hf: a {type(block).__name__} needs a layer with an RMSNorm out_norm")
    copy_into(getattr(block, attr).weight, norm.weight_D)
    return _relayer(layer, out_norm=None)


PLAIN = StructureForm("—", _plain_read, _plain_write)
OUT_NORM = StructureForm(
    "RMS norm on the output (`post_mlp_layernorm`)",
    partial(_out_norm_read, attr="post_mlp_layernorm"),
    partial(_out_norm_write, attr="post_mlp_layernorm"),
)


# --- j27b: decoder-inline MoE (Gemma-4): a normalising router, norms on both branches ---


def _normed_softmax_read(r: nn.Module, block: nn.Module) -> tuple[Router, None]:
    """Gemma-4: ``proj(rms(x) · scale · D^-½)``, softmax (float32), top-k, renormalised.

    Its ``per_expert_scale`` multiplies the combine weights after the renormalisation:
    :data:`BRANCH_NORMS` puts it on the bank (:class:`~moeblocks.experts.ScaledExperts`).
    """
    D = r.proj.weight.shape[1]
    # Gemma's weightless norm (pow), then its scale in the model dtype (Llama's order).
    norm = RMSNorm(D, float(r.norm.variance_epsilon), inverse_root="pow")
    _like(norm, r.scale)
    copy_into(norm.weight_D, r.scale)
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
    copy_into(r.scale, scorer.norm.weight_D)


NORMED_SOFTMAX = RouterForm(
    "RMS-normalised input (own scale, × D^-½), softmax (float32), top-k, renormalised",
    _normed_softmax_read,
    _normed_softmax_write,
)


def _normed_dense_read(block: nn.Module, attr: str, pre: str, post: str) -> SharedExperts:
    bank = NormedExperts(
        _dense_glu(getattr(block, attr)),
        _rms_norm(getattr(block, pre), "compute"),
        _rms_norm(getattr(block, post), "compute"),
    )
    return SharedExperts(bank)


def _normed_dense_write(
    shared: SharedExperts | None, block: nn.Module, attr: str, pre: str, post: str
) -> None:
    bank = None if shared is None else shared.experts
    if not isinstance(bank, NormedExperts) or bank.input_norm is None or bank.output_norm is None:
        raise ValueError(
            f"to_hf: a {type(block).__name__} needs shared experts of a NormedExperts "
            "with an input and an output norm"
        )
    _dense_glu_back(SharedExperts(bank.experts), getattr(block, attr))
    copy_into(getattr(block, pre).weight, bank.input_norm.weight_D)
    copy_into(getattr(block, post).weight, bank.output_norm.weight_D)


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
    scaled = ScaledExperts(layer.experts)
    _like(scaled, block.router.per_expert_scale)
    copy_into(scaled.scale_E, block.router.per_expert_scale)
    return _relayer(
        layer,
        experts=scaled,
        routed_input_norm=_rms_norm(block.pre_feedforward_layernorm_2, "compute"),
        routed_norm=_rms_norm(block.post_feedforward_layernorm_2, "compute"),
        out_norm=_rms_norm(block.post_feedforward_layernorm, "compute"),
    )


def _branch_norms_write(layer: MoELayer, block: nn.Module) -> MoELayer:
    bank, norms = layer.experts, (layer.routed_input_norm, layer.routed_norm, layer.out_norm)
    if not (isinstance(bank, ScaledExperts) and all(isinstance(n, RMSNorm) for n in norms)):
        raise ValueError(
            f"to_hf: a {type(block).__name__} needs a ScaledExperts bank and RMSNorms as "
            "routed_input_norm, routed_norm and out_norm"
        )
    copy_into(block.router.per_expert_scale, bank.scale_E)
    for name, norm in zip(
        (
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_2",
            "post_feedforward_layernorm",
        ),
        norms,
        strict=True,
    ):
        copy_into(getattr(block, name).weight, norm.weight_D)
    return _relayer(
        layer, experts=bank.experts, routed_input_norm=None, routed_norm=None, out_norm=None
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
