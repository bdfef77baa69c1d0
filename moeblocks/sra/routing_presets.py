"""The routing of each MoE family at the decoder's scale: one preset per family.

Legend: D model dim, E experts, F expert hidden width (``config.d_expert``), K the
config's top-k (``config.k_final``), L layers.

``config.ffn`` picks the feed-forward network of every decoder block. ``"cosine"`` (SRA,
the default) and ``"linear"`` are the paper's routers; ``"dense"`` is an MLP of the same
active size; every other name gives the routing of a published family — its scoring,
selection, weight policy, balancing rule (with its published coefficient), shared
expert and capacity — composed from stock moeblocks parts. Everything else (attention,
the expert MLP kind from ``config.expert``, its biases, the init, dropout) is the
decoder's, so a comparison between presets compares routing rules.

**The scaling rule.** Every preset keeps the config's E, and the active FFN hidden units
per token of the SRA default, K·F (routers aside). A family keeps its published
structure and changes only the widths:

| preset | routed k | routed width | shared width | as published |
|---|---|---|---|---|
| mixtral, olmoe, gpt_oss | K | F | none | |
| qwen2_moe | K | F/2 | K·F/2, gated | shared = k × routed (5632 = 4 × 1408) |
| deepseek_v3 | K | K·F/(K+1) | = routed | one shared, as wide (2048) |
| llama4 | 1 | K·F/2 | = routed | top-1, one shared as wide (8192) |
| switch | 1 | K·F | none | top-1 |

Widths are rounded to the nearest integer, so active parameters match to within half a
hidden unit per active expert; the routers' own extras (a router bias, a shared-expert
gate, τ) come on top. Switch and Llama 4 route to one expert, as published: their wider
experts hold the active size (and so more parameters in all).

**The k curriculum** (``k_start`` → ``k_final`` at ``k_switch``) is SRA's recipe; the
families publish a fixed k, so they route their k from step 0 and ignore ``k_start``
and ``k_switch``. An explicit ``k`` (the inference-time k-sweep) still applies to all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from moeblocks.balancing import BiasBalancer
from moeblocks.capacity import Capacity
from moeblocks.dispatchers import make_dispatcher
from moeblocks.experts import ExpertInit, GELUExperts, SwiGLUExperts
from moeblocks.gating import GroupLimitedTopK, WeightPolicy
from moeblocks.layer import MoELayer
from moeblocks.losses import (
    AuxLoss,
    BandpassLoss,
    CVSquaredLoss,
    DispersionLoss,
    LoadBalanceLoss,
    SequenceBalanceLoss,
    ZLoss,
)
from moeblocks.routers import CosineScorer, LinearScorer, Router
from moeblocks.runtime.errors import UsageError
from moeblocks.schedules import ConstantK, KSchedule, StepK
from moeblocks.shared import SharedExperts
from moeblocks.sra.config import FAMILY_FFNS, FFN_CHOICES, SRAConfig
from moeblocks.sra.dense import DenseFFN

__all__ = [
    "FAMILIES",
    "PARTS",
    "ROUTING_ZOO",
    "Widths",
    "build_ffn",
    "build_losses",
    "build_moe",
    "build_schedule",
    "check_ffn",
    "composition",
    "describe",
    "expert_bank",
    "k_label",
    "trained_k",
    "widths",
]

ROUTING_ZOO: tuple[str, ...] = (
    "cosine",
    "mixtral",
    "qwen2_moe",
    "olmoe",
    "deepseek_v3",
    "gpt_oss",
    "switch",
    "llama4",
)
"""SRA's cosine routing and every family preset: the routings a routing-zoo run compares."""

FAMILIES: tuple[str, ...] = FAMILY_FFNS
"""The family presets (``ROUTING_ZOO`` without SRA's own ``"cosine"``)."""

PARTS: tuple[str, ...] = ("scoring", "selection", "weights", "balancing", "shared", "capacity")
"""The parts :func:`composition` describes for each ``ffn`` choice."""

# DeepSeek-V3's node-limited routing: 8 groups, 4 per token, a group scored by its 2
# highest keys (256 experts in groups of 32; here E/8 per group).
_DSV3_GROUPS, _DSV3_GROUPS_PER_TOKEN, _DSV3_GROUP_SCORE_K = 8, 4, 2


@dataclass(frozen=True)
class Widths:
    """A preset's routed k and expert widths at one config.

    Attributes:
        k: Routed experts per token (after any curriculum).
        routed: Hidden width of one routed expert.
        shared: Hidden width of the shared expert (0: none).
    """

    k: int
    routed: int
    shared: int

    @property
    def active_hidden(self) -> int:
        """Expert hidden units a token passes through: ``k · routed + shared``."""
        return self.k * self.routed + self.shared


# Per family: (routes top-1 as published, shared width in routed widths as f(k)).
_SHAPES: dict[str, tuple[bool, Callable[[int], int]]] = {
    "mixtral": (False, lambda k: 0),
    "qwen2_moe": (False, lambda k: k),
    "olmoe": (False, lambda k: 0),
    "deepseek_v3": (False, lambda k: 1),
    "gpt_oss": (False, lambda k: 0),
    "switch": (True, lambda k: 0),
    "llama4": (True, lambda k: 1),
}


def widths(config: SRAConfig) -> Widths:
    """The routed k and expert widths of ``config.ffn`` (see the scaling rule above).

    Raises:
        UsageError: For ``ffn="dense"``, which routes nothing.
    """
    if config.ffn == "dense":
        raise UsageError("config.ffn='dense' has no experts to size; see config.dense_width")
    if config.ffn not in _SHAPES:  # SRA's own routers: the config's k and F
        return Widths(config.k_final, config.d_expert, 0)
    top1, shared_units = _SHAPES[config.ffn]
    k = 1 if top1 else config.k_final
    units = k + shared_units(k)
    # Nearest integer (halves up), in integers: K·F / units.
    routed = max(1, (2 * config.k_final * config.d_expert + units) // (2 * units))
    return Widths(k, routed, (units - k) * routed)


def trained_k(config: SRAConfig) -> int:
    """The k every router uses once training is over (its k-sweep's reference point).

    ``k_final`` for SRA's routers (and the width multiple of the dense FFN); a family's
    own k otherwise (1 for Switch and Llama 4).
    """
    return config.k_final if config.ffn == "dense" else widths(config).k


def k_label(config: SRAConfig) -> str:
    """How reports name the k of a run: ``"1->2"`` for a curriculum, else the fixed k."""
    if config.ffn in _SHAPES or config.k_start == config.k_final:
        return str(trained_k(config))
    return f"{config.k_start}->{config.k_final}"


def check_ffn(config: SRAConfig) -> None:
    """Check that ``config.ffn`` can be built at this size, before a run writes anything.

    Raises:
        UsageError: For DeepSeek-V3's group-limited routing when E does not split into 8
            groups of at least 2 experts, or K exceeds the experts of 4 groups.
    """
    if config.ffn != "deepseek_v3":
        return
    E, K, G = config.num_experts, config.k_final, _DSV3_GROUPS
    if E % G or E // G < _DSV3_GROUP_SCORE_K or K > _DSV3_GROUPS_PER_TOKEN * (E // G):
        raise UsageError(
            f"ffn='deepseek_v3' routes within {G} groups of experts ({_DSV3_GROUPS_PER_TOKEN} "
            f"per token, each scored by its {_DSV3_GROUP_SCORE_K} best): num_experts must be "
            f"a multiple of {G} and >= {G * _DSV3_GROUP_SCORE_K}, and k_final <= num_experts/2; "
            f"got num_experts={E}, k_final={K}"
        )


def build_schedule(config: SRAConfig) -> KSchedule:
    """The k curriculum: ``k_start`` until ``k_switch · steps``, then ``k_final``."""
    switch = config.k_switch_step
    if config.k_start == config.k_final or switch == 0:
        return ConstantK(config.k_final if switch == 0 else config.k_start)
    return StepK({0: config.k_start, switch: config.k_final})


def build_losses(config: SRAConfig) -> dict[str, AuxLoss]:
    """The auxiliary losses of SRA's own routers (cosine, linear), keyed by name."""
    losses: dict[str, AuxLoss] = {}
    w = config.balance_weight
    if config.balance == "bandpass":
        losses["bandpass"] = BandpassLoss(config.band_floor, config.band_ceiling, weight=w)
    elif config.balance == "cv":
        losses["cv"] = CVSquaredLoss(weight=w)
    elif config.balance == "switch":
        losses["switch"] = LoadBalanceLoss(weight=w)
    if config.z_loss_weight > 0:
        losses["z"] = ZLoss(weight=config.z_loss_weight)
    if config.dispersion_weight > 0 and config.ffn == "cosine":
        losses["dispersion"] = DispersionLoss(weight=config.dispersion_weight)
    return losses


def expert_bank(config: SRAConfig, num_experts: int, hidden: int) -> nn.Module:
    """A bank of the config's expert MLP kind (biases, init, dropout) at width ``hidden``."""
    init = None
    if config.init == "gpt2":
        init = ExpertInit(std=0.02, out_scale=1 / math.sqrt(2 * config.n_layers))
    common = {"bias": config.expert_bias, "init": init, "dropout": config.dropout}
    D = config.d_model
    if config.expert == "swiglu":
        return SwiGLUExperts(num_experts, D, hidden, **common)
    return GELUExperts(num_experts, D, hidden, activation=config.expert, **common)


def _gate(config: SRAConfig, *, bias: bool = False, dtype: str = "input") -> LinearScorer:
    """A family's linear gate (``dtype="float32"``: cast first, as DeepSeek-V3 and Switch)."""
    std = 0.02 if config.init == "gpt2" else None
    return LinearScorer(
        config.d_model, config.num_experts, bias=bias, compute_dtype=dtype, init_std=std
    )


def _layer(
    config: SRAConfig,
    router: Router,
    w: Widths,
    losses: dict[str, AuxLoss],
    *,
    gated: bool = False,
    capacity: Capacity | None = None,
    weight_inputs: bool = False,
) -> MoELayer:
    """Router + the config's dispatcher + routed (and shared) banks at the family's widths."""
    # Routed bank first: eager construction draws in the order init_weights re-draws on a
    # meta-built model (the layer's module order), so both give the same tensors.
    experts = expert_bank(config, config.num_experts, w.routed)
    shared = SharedExperts(expert_bank(config, 1, w.shared), gate=gated) if w.shared else None
    return MoELayer(
        router,
        make_dispatcher(config.dispatcher),
        experts,
        losses,
        shared=shared,
        capacity=capacity,
        weight_inputs=weight_inputs,
    )


def _sra(config: SRAConfig, w: Widths) -> MoELayer:
    """SRA's cosine router (or its linear twin), the k curriculum and the config's losses."""
    if config.ffn == "cosine":
        scorer: nn.Module = CosineScorer(
            config.d_model,
            config.num_experts,
            init=config.anchor_init,
            temperature=config.temperature,
        )
    else:  # float32 scores, as the official gate (and the cosine scorer) computes them
        scorer = _gate(config, dtype="float32")
    router = Router(
        scorer,
        schedule=build_schedule(config),
        noise_std=config.router_noise,
        # The official renormalisation: top-k weights / (their sum + 1e-6) when K > 1.
        weights=WeightPolicy(renormalize="k>1", eps=1e-6),
    )
    return _layer(config, router, w, build_losses(config))


# Balance-loss coefficients: the paper's where it gives one (OLMoE, Switch, DeepSeek-V3),
# else Hugging Face's config default, which its model trains with (router_aux_loss_coef,
# on HF's token fractions, which sum to k).
def _mixtral(config: SRAConfig, w: Widths) -> MoELayer:
    router = Router(_gate(config), w.k, weights=WeightPolicy(renormalize="always"))
    return _layer(config, router, w, {"balance": LoadBalanceLoss(0.001, fractions="tokens")})


def _qwen2_moe(config: SRAConfig, w: Widths) -> MoELayer:
    router = Router(_gate(config), w.k, weights=WeightPolicy(renormalize="never"))
    losses: dict[str, AuxLoss] = {"balance": LoadBalanceLoss(0.001, fractions="tokens")}
    return _layer(config, router, w, losses, gated=True)


def _olmoe(config: SRAConfig, w: Widths) -> MoELayer:
    router = Router(_gate(config), w.k, weights=WeightPolicy(renormalize="never"))
    losses = {"balance": LoadBalanceLoss(0.01, fractions="tokens"), "z": ZLoss(0.001)}
    return _layer(config, router, w, losses)


def _deepseek_v3(config: SRAConfig, w: Widths) -> MoELayer:
    router = Router(
        _gate(config, dtype="float32"),
        w.k,
        scoring="sigmoid",
        selection=GroupLimitedTopK(
            _DSV3_GROUPS, _DSV3_GROUPS_PER_TOKEN, group_score_k=_DSV3_GROUP_SCORE_K
        ),
        weights=WeightPolicy(renormalize="always", scale=2.5, eps=1e-20),
        balancer=BiasBalancer(config.num_experts, rate=1e-3),
    )
    return _layer(config, router, w, {"sequence": SequenceBalanceLoss(1e-4)})


def _gpt_oss(config: SRAConfig, w: Widths) -> MoELayer:
    weights = WeightPolicy(renormalize="never")
    router = Router(_gate(config, bias=True), w.k, scoring="softmax_topk", weights=weights)
    return _layer(config, router, w, {"balance": LoadBalanceLoss(0.001, fractions="tokens")})


def _switch(config: SRAConfig, w: Widths) -> MoELayer:
    # k = 1 keeps the raw probability as the weight. Capacity counts over one forward's
    # batch, as Switch over one device's batch: a rank's slice under torchrun (so a W-rank
    # run drops differently from one process), the eval batch in validation.
    router = Router(_gate(config, dtype="float32"), w.k, jitter=0.01)
    capacity = Capacity(factor=1.25, per="batch")
    return _layer(config, router, w, {"balance": LoadBalanceLoss(0.01)}, capacity=capacity)


def _llama4(config: SRAConfig, w: Widths) -> MoELayer:
    weights = WeightPolicy(renormalize="never")
    router = Router(_gate(config), w.k, scoring="sigmoid", weights=weights)
    return _layer(config, router, w, {}, weight_inputs=True)


_BUILDERS: dict[str, Callable[[SRAConfig, Widths], MoELayer]] = {
    "cosine": _sra,
    "linear": _sra,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
    "switch": _switch,
    "llama4": _llama4,
}


def build_moe(config: SRAConfig) -> MoELayer:
    """The MoE layer of a routed ``config.ffn`` (every choice but ``"dense"``).

    Raises:
        UsageError: For ``"dense"``, or a size the preset cannot route (:func:`check_ffn`).
    """
    if config.ffn not in _BUILDERS:
        raise UsageError(
            f"config.ffn={config.ffn!r} is not routed; expected one of {', '.join(_BUILDERS)}"
        )
    check_ffn(config)
    return _BUILDERS[config.ffn](config, widths(config))


def build_ffn(config: SRAConfig) -> nn.Module:
    """The feed-forward network of one decoder block: the dense MLP or an MoE layer."""
    return DenseFFN(config) if config.ffn == "dense" else build_moe(config)


_SRA_PARTS = {
    "weights": "renormalised over the k when k > 1 (sum + 1e-6)",
    "balancing": "the config's balance loss (bandpass × 0.4 in the presets), averaged over layers",
    "shared": "none",
    "capacity": "none",
}
_COMPOSITIONS: dict[str, dict[str, str]] = {
    "cosine": {
        "scoring": "|τ| · cos(x, anchor_e), softmax over all E",
        "selection": "top-k, k curriculum k_start → k_final at k_switch",
        **_SRA_PARTS,
    },
    "linear": {
        "scoring": "linear gate (float32), softmax over all E",
        "selection": "top-k, k curriculum k_start → k_final at k_switch",
        **_SRA_PARTS,
    },
    "dense": {
        "scoring": "none (dense)",
        "selection": "none: one MLP of width k_final · F per token",
        "weights": "none",
        "balancing": "none",
        "shared": "none",
        "capacity": "none",
    },
    "mixtral": {
        "scoring": "linear gate, softmax over all E",
        "selection": "top-k",
        "weights": "renormalised over the k (the softmax of the k logits)",
        "balancing": "load balance E·Σ f·P (token fractions) × 0.001 (HF's coefficient)",
        "shared": "none",
        "capacity": "none (dropless)",
    },
    "qwen2_moe": {
        "scoring": "linear gate, softmax over all E",
        "selection": "top-k",
        "weights": "raw probabilities (norm_topk_prob false)",
        "balancing": "load balance (token fractions) × 0.001 (HF's coefficient)",
        "shared": "one expert k times as wide as a routed one, behind a sigmoid gate; routed F/2",
        "capacity": "none (dropless)",
    },
    "olmoe": {
        "scoring": "linear gate, softmax over all E",
        "selection": "top-k",
        "weights": "raw probabilities",
        "balancing": "load balance (token fractions) × 0.01 + router z-loss × 0.001 (paper)",
        "shared": "none",
        "capacity": "none (dropless)",
    },
    "deepseek_v3": {
        "scoring": "linear gate in float32, sigmoid per expert",
        "selection": "group-limited top-k (8 groups, the 4 best by their 2 highest keys) "
        "on sigmoid + a selection-only bias",
        "weights": "renormalised over the k, × 2.5",
        "balancing": "aux-loss-free bias += 0.001 · sign(mean load − load) after every "
        "optimizer step; sequence-wise balance loss × 0.0001 (paper)",
        "shared": "one expert as wide as a routed one; widths k·F/(k+1)",
        "capacity": "none (dropless)",
    },
    "gpt_oss": {
        "scoring": "linear gate with a bias; softmax over the k chosen logits",
        "selection": "top-k by logit",
        "weights": "the softmax over the k chosen logits",
        "balancing": "load balance (token fractions) × 0.001 (HF's coefficient)",
        "shared": "none",
        "capacity": "none (dropless)",
    },
    "switch": {
        "scoring": "linear gate in float32 on jittered inputs (× U[0.99, 1.01] in "
        "training), softmax over all E",
        "selection": "top-1 (published); the expert k_final times as wide",
        "weights": "the raw probability",
        "balancing": "load balance × 0.01 (paper)",
        "shared": "none",
        "capacity": "factor 1.25 over each forward's batch; an overflowing token skips the layer",
    },
    "llama4": {
        "scoring": "linear gate, sigmoid of the chosen logit",
        "selection": "top-1 (published)",
        "weights": "the sigmoid scales the expert's input; outputs summed unweighted",
        "balancing": "none (none published; HF's Llama 4 computes none)",
        "shared": "one expert as wide as the routed one; widths k_final·F/2",
        "capacity": "none (dropless)",
    },
}


def composition(name: str) -> dict[str, str]:
    """What routing the ``ffn`` choice ``name`` composes, by part (:data:`PARTS`).

    Raises:
        UsageError: For a name that is no ``ffn`` choice; the message lists them.
    """
    if name not in _COMPOSITIONS:
        raise UsageError(f"unknown ffn {name!r}; expected one of {', '.join(FFN_CHOICES)}")
    return dict(_COMPOSITIONS[name])


def describe(name: str) -> str:
    """One line per docs table row: ``"scoring: ...; selection: ...; ..."``.

    Raises:
        UsageError: For a name that is no ``ffn`` choice; the message lists them.
    """
    parts = composition(name)
    return "; ".join(f"{part}: {parts[part]}" for part in PARTS)
