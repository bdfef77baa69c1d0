"""Convert Hugging Face sparse-MoE blocks to moeblocks layers and back.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

Each supported block class maps to a :class:`Family`: how to read its router, experts
and shared experts into an :class:`~moeblocks.MoELayer` composed from stock blocks, and
how to write the weights back. Nothing here imports transformers: blocks are recognised
by class name (their own or a base class's), so this module also serves a model loaded
by an installed transformers of another version, as long as the weight layout matches.

Weight layouts read (transformers 5.x):

- Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GLM-4-MoE: ``experts.gate_up_proj``
  ``[E, 2F, D]`` (gate rows first) and ``experts.down_proj`` ``[E, D, F]``, i.e.
  ``nn.Linear`` layouts; moeblocks stores ``[E, D, 2F]`` and ``[E, F, D]``.
- GPT-OSS: ``gate_up_proj`` ``[E, D, 2F]`` with gate and up *interleaved* along the last
  dim (even columns gate, odd columns up), biases likewise; ``down_proj`` ``[E, F, D]``.
- Llama-4: ``gate_up_proj`` ``[E, D, 2F]`` (gate first), ``down_proj`` ``[E, F, D]``.
- Switch Transformers: one ``wi``/``wo`` ``nn.Linear`` pair per expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moeblocks.activations import GLU, ClampedSwiGLU
from moeblocks.balancing import BiasBalancer
from moeblocks.capacity import Capacity
from moeblocks.dispatch import Dispatcher, TorchDispatcher
from moeblocks.experts import MLPExperts, SwiGLUExperts
from moeblocks.gating import GroupLimitedTopK, Selection, TopK, WeightPolicy
from moeblocks.layer import MoELayer
from moeblocks.routers import LinearScorer, Router
from moeblocks.shared import SharedExperts

__all__ = ["SUPPORTED", "Family", "family_of", "from_hf", "is_moe_block", "to_hf"]

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


def _activation_name(act: nn.Module) -> str:
    name = type(act).__name__
    if name == "GELU" and getattr(act, "approximate", "none") == "tanh":
        return "gelu_tanh"
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported expert activation {name}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _like(module: nn.Module, ref: Tensor) -> nn.Module:
    return module.to(device=ref.device, dtype=ref.dtype)


@torch.no_grad()
def _copy(dst: Tensor, src: Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"weight shape mismatch: have {tuple(dst.shape)}, got {tuple(src.shape)}")
    dst.copy_(src)


# --- shared pieces: linear routers, concatenated gate/up banks, dense SwiGLU MLPs --------


def _linear_scorer(weight_ED: Tensor, bias_E: Tensor | None, compute_dtype: str) -> LinearScorer:
    E, D = weight_ED.shape
    scorer = LinearScorer(D, E, bias=bias_E is not None, compute_dtype=compute_dtype)
    _like(scorer, weight_ED)
    _copy(scorer.weight_ED, weight_ED)
    if bias_E is not None:
        _copy(scorer.bias_E, bias_E)
    return scorer


def _concat_bank(experts: nn.Module) -> SwiGLUExperts:
    """Bank from ``gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]`` (Linear layouts)."""
    E, width, D = experts.gate_up_proj.shape
    bank = SwiGLUExperts(E, D, width // 2, activation=GLU(_activation_name(experts.act_fn)))
    _like(bank, experts.gate_up_proj)
    _copy(bank.w_in_EDF2, experts.gate_up_proj.transpose(1, 2))
    _copy(bank.w_out_EFD, experts.down_proj.transpose(1, 2))
    return bank


def _concat_bank_back(bank: SwiGLUExperts, experts: nn.Module) -> None:
    _copy(experts.gate_up_proj, bank.w_in_EDF2.transpose(1, 2))
    _copy(experts.down_proj, bank.w_out_EFD.transpose(1, 2))


def _dense_glu(mlp: nn.Module, act: nn.Module) -> SwiGLUExperts:
    """One-expert bank from an ``nn.Linear`` gate_proj / up_proj / down_proj MLP."""
    F, D = mlp.gate_proj.weight.shape
    bank = SwiGLUExperts(1, D, F, activation=GLU(_activation_name(act)))
    _like(bank, mlp.gate_proj.weight)
    _copy(bank.w_in_EDF2[0], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t())
    _copy(bank.w_out_EFD[0], mlp.down_proj.weight.t())
    return bank


def _dense_glu_back(shared: SharedExperts | None, mlp: nn.Module) -> None:
    if shared is None or not isinstance(shared.experts, SwiGLUExperts):
        raise ValueError("to_hf: the block has a shared SwiGLU expert, the layer has none")
    bank = shared.experts
    gate_FD, up_FD = bank.w_in_EDF2[0].t().chunk(2, dim=0)
    _copy(mlp.gate_proj.weight, gate_FD)
    _copy(mlp.up_proj.weight, up_FD)
    _copy(mlp.down_proj.weight, bank.w_out_EFD[0].t())


def _mlp_act(mlp: nn.Module) -> nn.Module:
    return mlp.act_fn if hasattr(mlp, "act_fn") else mlp.activation_fn


def _check_bank(
    layer: MoELayer, kind: type, block: nn.Module, bias: bool = False, router_bias: bool = False
) -> None:
    """to_hf writes only what the family has: refuse a layer with more or other parts."""
    bank, name = layer.experts, type(block).__name__
    if not isinstance(bank, kind):
        raise TypeError(
            f"to_hf: a {name} needs a layer whose bank is {kind.__name__}, "
            f"got {type(bank).__name__}"
        )
    if bank.has_bias != bias:
        raise ValueError(f"to_hf: a {name} has {'' if bias else 'no '}expert biases")
    if (layer.router.gate_bias is not None) != router_bias:
        raise ValueError(f"to_hf: a {name} has {'a' if router_bias else 'no'} router bias")


# --- families ---------------------------------------------------------------------------


def _softmax_router(router: nn.Module, renormalize: str, jitter: float = 0.0) -> Router:
    return Router(
        _linear_scorer(router.weight, None, "input"),
        router.top_k,
        weights=WeightPolicy(renormalize),
        jitter=jitter,
        routing_dtype=torch.float32,  # these routers softmax in float32 in any model dtype
    )


def _from_mixtral(block: nn.Module, dispatcher: Dispatcher) -> MoELayer:
    # Mixtral renormalises the top-k probabilities even for k = 1 (the weight is then 1).
    router = _softmax_router(block.gate, "always", float(getattr(block, "jitter_noise", 0.0)))
    return MoELayer(router, dispatcher, _concat_bank(block.experts))


def _from_qwen(block: nn.Module, dispatcher: Dispatcher) -> MoELayer:
    gate = block.gate
    router = _softmax_router(gate, "always" if gate.norm_topk_prob else "never")
    shared = None
    if getattr(block, "shared_expert", None) is not None:
        mlp = block.shared_expert
        shared = SharedExperts(_dense_glu(mlp, _mlp_act(mlp)), gate=True)
        _like(shared, block.shared_expert_gate.weight)
        _copy(shared.gate_D, block.shared_expert_gate.weight[0])
    return MoELayer(router, dispatcher, _concat_bank(block.experts), shared=shared)


def _to_concat(layer: MoELayer, block: nn.Module) -> None:
    gate = block.gate
    _copy(gate.weight, layer.router.gate_weight)
    _check_bank(layer, SwiGLUExperts, block)
    _concat_bank_back(layer.experts, block.experts)
    if getattr(block, "shared_expert", None) is not None:
        _dense_glu_back(layer.shared, block.shared_expert)
        _copy(block.shared_expert_gate.weight[0], layer.shared.gate_D)
    if getattr(block, "shared_experts", None) is not None:
        _dense_glu_back(layer.shared, block.shared_experts)
    if isinstance(getattr(gate, "e_score_correction_bias", None), Tensor):
        _copy(gate.e_score_correction_bias, layer.router.balancer.bias)


def _from_deepseek(block: nn.Module, dispatcher: Dispatcher) -> MoELayer:
    gate = block.gate
    E = gate.weight.shape[0]
    selection: Selection = (
        TopK() if gate.num_group == 1 else GroupLimitedTopK(gate.num_group, gate.topk_group)
    )
    # The bias is fixed in a pretrained model; set balancer.rate to train it further.
    balancer = BiasBalancer(E, rate=0.0).to(gate.e_score_correction_bias.device)
    _copy(balancer.bias, gate.e_score_correction_bias.float())
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
    mlp = block.shared_experts
    shared = SharedExperts(_dense_glu(mlp, _mlp_act(mlp)))
    return MoELayer(router, dispatcher, _concat_bank(block.experts), shared=shared)


def _from_gpt_oss(block: nn.Module, dispatcher: Dispatcher) -> MoELayer:
    r, ex = block.router, block.experts
    router = Router(
        _linear_scorer(r.weight, r.bias, "input"),
        r.top_k,
        scoring="softmax_topk",
        weights=WeightPolicy("never"),  # the softmax over the top-k already sums to 1
    )
    E, D, width = ex.gate_up_proj.shape
    bank = SwiGLUExperts(E, D, width // 2, activation=ClampedSwiGLU(ex.alpha, ex.limit), bias=True)
    _like(bank, ex.gate_up_proj)
    gu, gub = ex.gate_up_proj, ex.gate_up_proj_bias
    _copy(bank.w_in_EDF2, torch.cat([gu[..., 0::2], gu[..., 1::2]], dim=-1))
    _copy(bank.b_in_EF2, torch.cat([gub[..., 0::2], gub[..., 1::2]], dim=-1))
    _copy(bank.w_out_EFD, ex.down_proj)
    _copy(bank.b_out_ED, ex.down_proj_bias)
    return MoELayer(router, dispatcher, bank)


def _to_gpt_oss(layer: MoELayer, block: nn.Module) -> None:
    r, ex, bank = block.router, block.experts, layer.experts
    _check_bank(layer, SwiGLUExperts, block, bias=True, router_bias=True)
    _copy(r.weight, layer.router.gate_weight)
    _copy(r.bias, layer.router.gate_bias)
    F = bank.hidden
    gate, up = bank.w_in_EDF2[..., :F], bank.w_in_EDF2[..., F:]
    _copy(ex.gate_up_proj, torch.stack([gate, up], dim=-1).flatten(-2))
    bgate, bup = bank.b_in_EF2[..., :F], bank.b_in_EF2[..., F:]
    _copy(ex.gate_up_proj_bias, torch.stack([bgate, bup], dim=-1).flatten(-2))
    _copy(ex.down_proj, bank.w_out_EFD)
    _copy(ex.down_proj_bias, bank.b_out_ED)


def _from_llama4(block: nn.Module, dispatcher: Dispatcher) -> MoELayer:
    ex = block.experts
    router = Router(
        _linear_scorer(block.router.weight, None, "input"),
        block.top_k,
        scoring="sigmoid",
        weights=WeightPolicy("never"),
        routing_dtype=torch.float32,  # its sigmoid runs in float32
    )
    E, D, width = ex.gate_up_proj.shape
    bank = SwiGLUExperts(E, D, width // 2, activation=GLU(_activation_name(ex.act_fn)))
    _like(bank, ex.gate_up_proj)
    _copy(bank.w_in_EDF2, ex.gate_up_proj)
    _copy(bank.w_out_EFD, ex.down_proj)
    mlp = block.shared_expert
    shared = SharedExperts(_dense_glu(mlp, _mlp_act(mlp)))
    # Llama-4 scales each routed copy's input by its weight, not the expert's output.
    return MoELayer(router, dispatcher, bank, shared=shared, weight_inputs=True)


def _to_llama4(layer: MoELayer, block: nn.Module) -> None:
    _check_bank(layer, SwiGLUExperts, block)
    _copy(block.router.weight, layer.router.gate_weight)
    _copy(block.experts.gate_up_proj, layer.experts.w_in_EDF2)
    _copy(block.experts.down_proj, layer.experts.w_out_EFD)
    _dense_glu_back(layer.shared, block.shared_expert)


def _from_switch(block: nn.Module, dispatcher: Dispatcher) -> MoELayer:
    r = block.router
    cls = r.classifier
    experts = [block.experts[f"expert_{e}"] for e in range(r.num_experts)]
    F, D = experts[0].wi.weight.shape
    router = Router(
        # The classifier runs in the router dtype (float32) whatever the model dtype.
        _linear_scorer(cls.weight, cls.bias, "float32"),
        1,
        weights=WeightPolicy("never"),
        jitter=float(r.jitter_noise),
        routing_dtype=torch.float32,
    )
    bank = MLPExperts(r.num_experts, D, F, activation=_activation_name(experts[0].act))
    _like(bank, experts[0].wi.weight)
    _copy(bank.w_in_EDF, torch.stack([m.wi.weight.t() for m in experts]))
    _copy(bank.w_out_EFD, torch.stack([m.wo.weight.t() for m in experts]))
    # Switch counts capacity per sequence, in token order.
    capacity = Capacity(limit=int(r.expert_capacity), per="sequence")
    return MoELayer(router, dispatcher, bank, capacity=capacity)


def _to_switch(layer: MoELayer, block: nn.Module) -> None:
    cls = block.router.classifier
    _check_bank(layer, MLPExperts, block, router_bias=cls.bias is not None)
    _copy(cls.weight, layer.router.gate_weight)
    if cls.bias is not None:
        _copy(cls.bias, layer.router.gate_bias)
    for e in range(layer.num_experts):
        expert = block.experts[f"expert_{e}"]
        _copy(expert.wi.weight, layer.experts.w_in_EDF[e].t())
        _copy(expert.wo.weight, layer.experts.w_out_EFD[e].t())


@dataclass(frozen=True)
class Family:
    """How one Hugging Face sparse-MoE block class maps onto moeblocks.

    Attributes:
        name: Family name (``"mixtral"``, ``"deepseek_v3"``, ...).
        block_class: The transformers class name of the sparse-MoE block.
        router_class: The class name of its router module (the module whose output
            transformers records for ``output_router_logits``).
        router_attr: Attribute of the block that holds the router.
        returns: What the block's forward returns: ``"tensor"`` (the output, same
            shape as the input), ``"tensor_and_weights"`` (GPT-OSS: the output and the
            ``[T, K]`` combine weights) or ``"flat_and_logits"`` (Llama-4: the output
            flattened to ``[T, D]`` and the ``[T, E]`` router logits).
        logits_index: Index of the router logits in the router module's output tuple.
        build: Builds the equivalent layer (what :func:`from_hf` calls).
        write_back: Writes a layer's weights into a block (what :func:`to_hf` calls).
        batched_logits: Whether the router returns logits in the input's leading shape
            (``[B, S, E]``, Switch) rather than flattened to ``[T, E]``.
    """

    name: str
    block_class: str
    router_class: str
    router_attr: str
    returns: str
    logits_index: int
    build: Callable[[nn.Module, Dispatcher], MoELayer]
    write_back: Callable[[MoELayer, nn.Module], None]
    batched_logits: bool = False


_FAMILIES = (
    Family(
        "mixtral",
        "MixtralSparseMoeBlock",
        "MixtralTopKRouter",
        "gate",
        "tensor",
        0,
        _from_mixtral,
        _to_concat,
    ),
    Family(
        "qwen2_moe",
        "Qwen2MoeSparseMoeBlock",
        "Qwen2MoeTopKRouter",
        "gate",
        "tensor",
        0,
        _from_qwen,
        _to_concat,
    ),
    Family(
        "qwen3_moe",
        "Qwen3MoeSparseMoeBlock",
        "Qwen3MoeTopKRouter",
        "gate",
        "tensor",
        0,
        _from_qwen,
        _to_concat,
    ),
    Family(
        "olmoe",
        "OlmoeSparseMoeBlock",
        "OlmoeTopKRouter",
        "gate",
        "tensor",
        0,
        _from_qwen,
        _to_concat,
    ),
    Family(
        "deepseek_v3",
        "DeepseekV3MoE",
        "DeepseekV3TopkRouter",
        "gate",
        "tensor",
        0,
        _from_deepseek,
        _to_concat,
    ),
    Family(
        "glm4_moe",
        "Glm4MoeMoE",
        "Glm4MoeTopkRouter",
        "gate",
        "tensor",
        0,
        _from_deepseek,
        _to_concat,
    ),
    Family(
        "gpt_oss",
        "GptOssMLP",
        "GptOssTopKRouter",
        "router",
        "tensor_and_weights",
        0,
        _from_gpt_oss,
        _to_gpt_oss,
    ),
    Family(
        "llama4",
        "Llama4TextMoe",
        "Llama4Router",
        "router",
        "flat_and_logits",
        1,
        _from_llama4,
        _to_llama4,
    ),
    Family(
        "switch_transformers",
        "SwitchTransformersSparseMLP",
        "SwitchTransformersTop1Router",
        "router",
        "tensor",
        2,
        _from_switch,
        _to_switch,
        batched_logits=True,
    ),
)
_BY_CLASS = {f.block_class: f for f in _FAMILIES}
SUPPORTED = tuple(f.block_class for f in _FAMILIES)


def family_of(block: nn.Module) -> Family | None:
    """The :class:`Family` of an HF sparse-MoE block (by its class or a base class), or None."""
    for cls in type(block).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    return None


def is_moe_block(module: nn.Module) -> bool:
    """Whether ``module`` is a sparse-MoE block that :func:`from_hf` converts."""
    return family_of(module) is not None


def _family(block: nn.Module) -> Family:
    family = family_of(block)
    if family is None:
        raise TypeError(
            f"from_hf/to_hf do not know {type(block).__name__}; supported block classes: "
            f"{', '.join(SUPPORTED)}"
        )
    return family


def from_hf(block: nn.Module, dispatcher: Dispatcher | None = None) -> MoELayer:
    """An :class:`~moeblocks.MoELayer` that computes what ``block`` computes.

    The weights are copied (the HF block is left untouched), on the block's device and
    in its dtype. Outputs, routing and gradients match the block in eval mode; in
    training mode the jitter differs where the block perturbs the experts' input too
    (Mixtral, and Switch whose in-place jitter reaches its experts in float32;
    moeblocks' jitter only reaches the router). A converted DeepSeek-V3 or
    GLM-4-MoE router keeps its selection bias in a
    :class:`~moeblocks.balancing.BiasBalancer` with ``rate=0``; raise the rate to keep
    balancing it while training.

    Args:
        block: A sparse-MoE block of a supported family (see :data:`SUPPORTED`).
        dispatcher: The dispatcher of the new layer (default
            :class:`~moeblocks.TorchDispatcher`).

    Raises:
        TypeError: For a block class that is not supported; the message lists them.
    """
    family = _family(block)
    layer = family.build(block, TorchDispatcher() if dispatcher is None else dispatcher)
    return layer.train(block.training)


def to_hf(layer: MoELayer, block: nn.Module) -> None:
    """Write ``layer``'s weights into ``block`` in place (the inverse of :func:`from_hf`).

    ``to_hf(from_hf(block), block)`` leaves every weight bit for bit as it was.

    Raises:
        TypeError: For an unsupported block class, or a layer whose expert bank has
            another type than the family needs.
        ValueError: When a weight shape differs.
    """
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a MoELayer, got {type(layer).__name__}")
    _family(block).write_back(layer, block)
