"""The family table: every routed MoE block class of transformers, converted or refused.

Legend: T tokens, D model dim, E experts, K experts per token.

A converted family is one :class:`Family` row of :data:`FAMILIES`: where its router
lives, how it routes (:class:`~moeblocks.hf.layouts.RouterForm`), how it stores its
experts (:class:`~moeblocks.hf.layouts.BankLayout`) and its shared experts
(:class:`~moeblocks.hf.layouts.SharedForm`), and what its forward returns. Many rows
differ from another only by class names (transformers copies a block per model). A block
class that cannot be expressed with today's parts is a row of :data:`REFUSED`, with the
reason. ``tests/test_hf_discovery.py`` walks the installed transformers and fails on a
routed MoE block class that is in neither table.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moeblocks.dispatch import Dispatcher
from moeblocks.hf.layouts import (
    AFMOE,
    BLOCK_BIAS_SIGMOID,
    BRANCH_NORMS,
    COHERE2,
    COHERE2_SHARED,
    CONCAT,
    CONCAT_CLAMPED,
    CONCAT_CLAMPED_AFTER,
    DEEPSEEK,
    DEEPSEEK_V2,
    DEEPSEEK_ZERO_FILL,
    GATED_SHARED_EXPERT,
    GEMMA_INLINE,
    GPT_OSS,
    HY_V3,
    INTERLEAVED,
    LFM2,
    LLAMA4,
    LOGIT_BIAS_SIGMOID,
    MISTRAL4,
    MISTRAL_LARGE4,
    NO_SHARED,
    NORMED_DENSE_MLP,
    NORMED_SOFTMAX,
    OUT_NORM,
    PER_EXPERT,
    PLAIN,
    SHARED_EXPERT,
    SHARED_EXPERTS,
    SHARED_EXPERTS_CLAMPED,
    SHARED_EXPERTS_CLAMPED_AFTER,
    SHARED_MLP,
    SIGMOID_TOPK,
    SOFTMAX,
    SOFTMAX_FP32_FLAG,
    SOFTMAX_NORM_FLAG,
    SOFTMAX_RAW,
    SOFTMAX_TOPK,
    SOFTMAX_TOPK_MODEL_DTYPE,
    STACKED,
    SWITCH,
    WG_SOFTMAX,
    BankLayout,
    InlineForm,
    RouterForm,
    SharedForm,
    StructureForm,
    compose,
)
from moeblocks.layer import MoELayer

__all__ = [
    "FAMILIES",
    "REFUSED",
    "SUPPORTED",
    "Family",
    "Refusal",
    "family_of",
    "refusal_of",
]


@dataclass(frozen=True)
class Family:
    """How one Hugging Face sparse-MoE block class maps onto moeblocks (one table row).

    Attributes:
        name: Family name (``"mixtral"``, ``"deepseek_v3"``, ...).
        block_class: The transformers class name of the sparse-MoE block.
        router_class: The class name of its router module (the module whose output
            transformers records for ``output_router_logits``).
        router: How the router routes and where its weights live.
        bank: How the routed experts (``block.experts``) are stored.
        shared: The shared experts, if any.
        router_attr: Attribute of the block that holds the router.
        returns: What the block's forward returns: ``"tensor"`` (the output, same
            shape as the input), ``"tensor_and_weights"`` (GPT-OSS: the output and the
            ``[T, K]`` combine weights) or ``"flat_and_logits"`` (Llama-4: the output
            flattened to ``[T, D]`` and the ``[T, E]`` router logits).
        logits_index: Index of the router logits in the router module's output tuple.
        batched_logits: Whether the router returns logits in the input's leading shape
            (``[B, S, E]``, Switch) rather than flattened to ``[T, E]``.
        structure: What the family adds around the router, bank and shared experts
            (norms on the output, on the branches, on the experts' input).
        inline: For a decoder layer holding its MoE part inline (Gemma-4), where that
            part lives; None for a sparse-MoE block of its own.
    """

    name: str
    block_class: str
    router_class: str
    router: RouterForm
    bank: BankLayout
    shared: SharedForm = NO_SHARED
    router_attr: str = "gate"
    returns: str = "tensor"
    logits_index: int = 0
    batched_logits: bool = False
    structure: StructureForm = PLAIN
    inline: InlineForm | None = None

    def build(self, block: nn.Module, dispatcher: Dispatcher) -> MoELayer:
        """The equivalent layer, with the block's weights (what :func:`from_hf` calls)."""
        layer = compose(block, self.router_attr, self.router, self.bank, self.shared, dispatcher)
        return self.structure.read(layer, block)

    def write_back(self, layer: MoELayer, block: nn.Module) -> None:
        """Write a layer's weights into a block in place (what :func:`to_hf` calls)."""
        layer = self.structure.write(layer, block)
        self.router.write(layer.router, getattr(block, self.router_attr), block)
        self.bank.write(layer.experts, block.experts)
        self.shared.write(layer.shared, block)


def _softmax(name: str, block: str, router: str, norm_flag: bool = True) -> Family:
    return Family(name, block, router, SOFTMAX_NORM_FLAG if norm_flag else SOFTMAX, CONCAT)


def _qwen_shared(name: str, block: str, router: str, norm_flag: bool = True) -> Family:
    form = SOFTMAX_NORM_FLAG if norm_flag else SOFTMAX
    return Family(name, block, router, form, CONCAT, GATED_SHARED_EXPERT)


def _deepseek(
    name: str,
    block: str,
    router: str,
    bank: BankLayout = CONCAT,
    shared: SharedForm = SHARED_EXPERTS,
) -> Family:
    return Family(name, block, router, DEEPSEEK, bank, shared)


def _granite(name: str, prefix: str) -> Family:
    # The shared MLP of GraniteMoeShared/Hybrid sits in the decoder layer, not the block.
    return Family(
        name, f"{prefix}MoE", f"{prefix}TopKRouter", SOFTMAX_TOPK, CONCAT, router_attr="router"
    )


def _gemma_inline(name: str, layer: str, router: str = "DiffusionGemmaTextRouter") -> Family:
    # Gemma-4's decoder-inline MoE part, copied by DiffusionGemma's encoder and decoder.
    return Family(
        name,
        layer,
        router,
        NORMED_SOFTMAX,
        CONCAT,
        NORMED_DENSE_MLP,
        router_attr="router",
        structure=BRANCH_NORMS,
        inline=GEMMA_INLINE,
    )


FAMILIES: tuple[Family, ...] = (
    _softmax("mixtral", "MixtralSparseMoeBlock", "MixtralTopKRouter", norm_flag=False),
    _softmax("minimax", "MiniMaxSparseMoeBlock", "MiniMaxTopKRouter", norm_flag=False),
    _qwen_shared("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeTopKRouter"),
    _qwen_shared("qwen3_next", "Qwen3NextSparseMoeBlock", "Qwen3NextTopKRouter"),
    _qwen_shared("qwen4_exp", "Qwen4ExpTextSparseMoeBlock", "Qwen4ExpTextTopKRouter"),
    _qwen_shared(
        "qwen3_omni_moe_talker",
        "Qwen3OmniMoeTalkerTextSparseMoeBlock",
        "Qwen3OmniMoeTalkerTextTopKRouter",
    ),
    _qwen_shared(
        "qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock", "Qwen3_5MoeTopKRouter", norm_flag=False
    ),
    _softmax("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeTopKRouter"),
    _softmax(
        "qwen3_omni_moe_thinker",
        "Qwen3OmniMoeThinkerTextSparseMoeBlock",
        "Qwen3OmniMoeThinkerTextTopKRouter",
    ),
    _softmax(
        "qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock", "Qwen3VLMoeTextTopKRouter", norm_flag=False
    ),
    _softmax("mellum", "MellumSparseMoeBlock", "MellumTopKRouter"),
    _softmax("olmoe", "OlmoeSparseMoeBlock", "OlmoeTopKRouter"),
    _softmax("flex_olmo", "FlexOlmoSparseMoeBlock", "FlexOlmoTopKRouter"),
    _deepseek("deepseek_v3", "DeepseekV3MoE", "DeepseekV3TopkRouter"),
    _deepseek("deepseek_v32", "DeepseekV32MoE", "DeepseekV32TopkRouter"),
    _deepseek("dots1", "Dots1MoE", "Dots1TopkRouter"),
    _deepseek("kimi_linear", "KimiLinearMoE", "KimiLinearTopkRouter"),
    _deepseek("glm4_moe", "Glm4MoeMoE", "Glm4MoeTopkRouter"),
    _deepseek("glm4_moe_lite", "Glm4MoeLiteMoE", "Glm4MoeLiteTopkRouter"),
    _deepseek("glm4v_moe", "Glm4vMoeTextMoE", "Glm4vMoeTextTopkRouter"),
    _deepseek("glm_moe_dsa", "GlmMoeDsaMoE", "GlmMoeDsaTopkRouter"),
    _deepseek("solar_open", "SolarOpenMoE", "SolarOpenTopkRouter"),
    _deepseek("minicpm5_moe", "MiniCPM5MoeMoE", "MiniCPM5MoeTopkRouter"),
    _deepseek(
        "glm5_next",
        "Glm5NextTextMoE",
        "Glm5NextTextTopkRouter",
        CONCAT_CLAMPED,
        SHARED_EXPERTS_CLAMPED,
    ),
    _deepseek("hy_v4", "HYV4MoE", "HYV4TopkRouter", CONCAT_CLAMPED),
    _deepseek("hy_v4_vl", "HYV4VLMoE", "HYV4VLTopkRouter", CONCAT_CLAMPED),
    Family(
        "deepseek_v2", "DeepseekV2Moe", "DeepseekV2TopkRouter", DEEPSEEK_V2, CONCAT, SHARED_EXPERTS
    ),
    Family(
        "deepseek_ocr2",
        "DeepseekOcr2TextMoe",
        "DeepseekOcr2TextTopkRouter",
        DEEPSEEK_V2,
        CONCAT,
        SHARED_EXPERTS,
    ),
    Family(
        "unlimited_ocr",
        "UnlimitedOcrTextMoe",
        "UnlimitedOcrTextTopkRouter",
        DEEPSEEK_V2,
        CONCAT,
        SHARED_EXPERTS,
    ),
    Family("mistral4", "Mistral4MoE", "Mistral4TopkRouter", MISTRAL4, CONCAT, SHARED_EXPERTS),
    Family(
        "mistral_large4",
        "MistralLarge4TextMoE",
        "MistralLarge4TextTopkRouter",
        MISTRAL_LARGE4,
        CONCAT,
        SHARED_EXPERTS,
    ),
    _granite("granitemoe", "GraniteMoe"),
    _granite("granitemoe_swa", "GraniteMoeSWA"),
    _granite("granitemoehybrid", "GraniteMoeHybrid"),
    _granite("granitemoeshared", "GraniteMoeShared"),
    Family(
        "jamba", "JambaSparseMoeBlock", "JambaTopKRouter", SOFTMAX_RAW, CONCAT, router_attr="router"
    ),
    Family(
        "minimax_m2", "MiniMaxM2SparseMoeBlock", "MiniMaxM2TopKRouter", BLOCK_BIAS_SIGMOID, CONCAT
    ),
    Family("hunyuan_v1_moe", "HunYuanMoEV1Moe", "HunYuanMoEV1Gate", WG_SOFTMAX, CONCAT, SHARED_MLP),
    _deepseek("exaone_moe", "ExaoneMoeSparseMoEBlock", "ExaoneMoeTopkRouter"),
    Family("mimo_v2_flash", "MiMoV2FlashMoE", "MiMoV2FlashTopkRouter", DEEPSEEK, CONCAT),
    Family("flint", "FlintSparseMoeBlock", "FlintTopKRouter", SIGMOID_TOPK, CONCAT, SHARED_EXPERT),
    Family(
        "lara_mini",
        "LaraMiniSparseMoeBlock",
        "LaraMiniTopKRouter",
        SOFTMAX_FP32_FLAG,
        CONCAT,
        SHARED_EXPERT,
    ),
    Family("lfm2_moe", "Lfm2MoeSparseMoeBlock", "Lfm2MoeTopKRouter", LFM2, CONCAT),
    Family("hy_v3", "HYV3MoE", "HYV3TopKRouter", HY_V3, CONCAT, SHARED_EXPERTS),
    Family(
        "afmoe",
        "AfmoeSparseMoeBlock",
        "AfmoeTokenChoiceRouter",
        AFMOE,
        CONCAT,
        SHARED_EXPERTS,
        router_attr="router",
    ),
    Family(
        "cohere2_moe",
        "Cohere2MoeSparseMoeBlock",
        "Cohere2MoeTopKRouter",
        COHERE2,
        CONCAT,
        COHERE2_SHARED,
    ),
    _deepseek("dots3_note", "Dots3NoteTextMoE", "Dots3NoteTextTopkRouter"),
    _deepseek(
        "bailing_hybrid",
        "BailingHybridMoE",
        "BailingHybridTopkRouter",
        CONCAT_CLAMPED_AFTER,
        SHARED_EXPERTS_CLAMPED_AFTER,
    ),
    Family(
        "kolibri1",
        "Kolibri1SparseMoeBlock",
        "Kolibri1TopKRouter",
        LOGIT_BIAS_SIGMOID,
        CONCAT,
        SHARED_EXPERTS,
    ),
    Family(
        "kolibri1_1",
        "Kolibri1_1SparseMoeBlock",
        "Kolibri1_1TopKRouter",
        LOGIT_BIAS_SIGMOID,
        CONCAT,
        SHARED_EXPERTS,
    ),
    Family(
        "aria",
        "AriaTextMoELayer",
        "AriaTextTopKRouter",
        SOFTMAX_TOPK_MODEL_DTYPE,
        STACKED,
        SHARED_EXPERTS,
        router_attr="router",
    ),
    Family(
        "gpt_oss",
        "GptOssMLP",
        "GptOssTopKRouter",
        GPT_OSS,
        INTERLEAVED,
        router_attr="router",
        returns="tensor_and_weights",
    ),
    Family(
        "llama4",
        "Llama4TextMoe",
        "Llama4Router",
        LLAMA4,
        STACKED,
        SHARED_EXPERT,
        router_attr="router",
        returns="flat_and_logits",
        logits_index=1,
    ),
    Family(
        "switch_transformers",
        "SwitchTransformersSparseMLP",
        "SwitchTransformersTop1Router",
        SWITCH,
        PER_EXPERT,
        router_attr="router",
        logits_index=2,
        batched_logits=True,
    ),
    # j27b: AXK-1's norm on the output, AXK-2's group-limited top-k filled with 0
    Family(
        "axk1",
        "AXK1MoE",
        "AXK1TopkRouter",
        DEEPSEEK,
        CONCAT,
        SHARED_EXPERTS,
        structure=OUT_NORM,
    ),
    Family("axk2", "AXK2MoE", "AXK2TopkRouter", DEEPSEEK_ZERO_FILL, CONCAT, SHARED_EXPERTS),
    # j27b: decoder-inline MoE (the MoE part of a decoder layer, see Family.inline)
    _gemma_inline("gemma4", "Gemma4TextDecoderLayer", "Gemma4TextRouter"),
    _gemma_inline("diffusion_gemma_encoder", "DiffusionGemmaEncoderTextLayer"),
    _gemma_inline("diffusion_gemma_decoder", "DiffusionGemmaDecoderTextLayer"),
)
"""Every converted block class, one row each."""

SUPPORTED = tuple(f.block_class for f in FAMILIES)
"""The block classes :func:`~moeblocks.hf.from_hf` converts."""

_BY_CLASS = {f.block_class: f for f in FAMILIES}


@dataclass(frozen=True)
class Refusal:
    """A routed MoE block class that :func:`~moeblocks.hf.from_hf` refuses, and why.

    Attributes:
        family: The transformers model folder (``"phimoe"``).
        block_class: The block class name.
        reason: What it needs that moeblocks lacks ("needs part X (not built yet)"), or
            why it is no routed MoE, or what is wrong with HF's block.
    """

    family: str
    block_class: str
    reason: str


def _needs(*parts: str) -> str:
    return "needs " + "; ".join(parts) + " (not built yet)"


_OUT_BIAS = "a bias added to the layer output"
_NOT_REVIEWED = "not reviewed yet: its router or experts differ from every converted row"

REFUSED: tuple[Refusal, ...] = (
    Refusal(
        "beam",
        "BeamMoE",
        _needs("a GLU computed in float32 inside a float64 expert (HF upcasts, then rounds)"),
    ),
    Refusal("dbrx", "DbrxFFN", _needs("DBRX's p-norm weight normalisation", "its expert layout")),
    Refusal(
        "deepseek_v4",
        "DeepseekV4SparseMoeBlock",
        _needs("sqrt-softplus scoring", "token-id hash routing"),
    ),
    Refusal(
        "dots3_note",
        "Dots3NoteVisionMoE",
        "not converted yet: its router is HY-V3's form, but the block is built from a "
        "per-layer config and has no tiny test here yet",
    ),
    Refusal(
        "ergo",
        "ErgoMoE",
        _needs("a per-expert output norm", "a norm on the shared output"),
    ),
    Refusal(
        "ernie4_5_moe",
        "Ernie4_5_MoeSparseMoeBlock",
        _needs(
            "a renormalisation floored at moe_norm_min (WeightPolicy adds eps)",
            "reading the selection bias of its moe_statics",
        ),
    ),
    Refusal(
        "ernie4_5_vl_moe",
        "Ernie4_5_VLMoeSparseMoeBlock",
        _needs("tokens split between a text and a vision MoE"),
    ),
    Refusal(
        "inkling", "InklingMoE", _needs("shared experts weighted by the router with the routed")
    ),
    Refusal("inkling2", "Inkling2SparseMoeBlock", _needs("a soft-capped SwiGLU")),
    Refusal("inkling2_loop", "Inkling2LoopSparseMoeBlock", _needs("a soft-capped SwiGLU")),
    Refusal(
        "jetmoe",
        "JetMoeAttention",
        _needs("attention-head experts: its projections are a JetMoeMoA"),
    ),
    Refusal(
        "jetmoe",
        "JetMoeMoA",
        _needs("attention-head experts (a mixture of attention heads)"),
    ),
    Refusal("jetmoe", "JetMoeMoE", _needs(_OUT_BIAS)),
    Refusal("doge", "DogeCDMoE", _needs("product-key routing over many tiny experts")),
    Refusal(
        "laguna",
        "LagunaSparseMoeBlock",
        _needs(
            "the routed-output scale applied after the experts, in the model dtype (folded "
            "into the float32 combine weights, with SoftCappedScorer for its logit cap, a "
            "float64 model differs by ~1e-8)"
        ),
    ),
    Refusal(
        "longcat_flash",
        "LongcatFlashMoE",
        _needs("parameter-free (zero/identity) experts"),
    ),
    Refusal(
        "minimax_m3_vl",
        "MiniMaxM3VLSparseMoeBlock",
        "not converted yet: a MiniMax-M2-style biased sigmoid router (bias on the router), "
        "the routed output scaled on the block, and a dense shared MLP not yet read",
    ),
    Refusal(
        "muse_spark",
        "MuseSparkMoE",
        _needs("a down/up projection around the experts", "a per-expert output norm"),
    ),
    Refusal(
        "nemotron_h",
        "NemotronHMoE",
        _needs("a down/up projection around the experts"),
    ),
    Refusal(
        "nllb_moe",
        "NllbMoeSparseMLP",
        "HF's block is wrong in transformers 5.25: it runs expert 1 with the top-1 gate and "
        "expert 0 with the top-2 gate for every token, ignoring the router's choice",
    ),
    Refusal(
        "openai_privacy_filter",
        "OpenAIPrivacyFilterMLP",
        "not converted yet: its block returns the combine weights divided by k (and "
        "multiplies the output by k), a return convention the swap adapter lacks",
    ),
    Refusal("phimoe", "PhimoeSparseMoeBlock", _needs("PhiMoE's SparseMixer routing")),
    Refusal(
        "step3p7",
        "Step3p7SparseMoeBlock",
        "not converted yet: ClampedGLU(after_activation=True) covers its experts; its router "
        "and block differ from every row and are not reviewed",
    ),
    Refusal(
        "vitpose_backbone",
        "VitPoseBackboneMoeMLP",
        "not a routed MoE: the expert is chosen by the dataset index passed in",
    ),
    Refusal("zaya", "ZayaSparseMoeBlock", _needs("an MLP router", "parameter-free experts")),
)
"""Every routed MoE block class of the installed transformers that is not converted."""


def family_of(block: nn.Module) -> Family | None:
    """The :class:`Family` of an HF sparse-MoE block (by its class or a base class), or None."""
    for cls in type(block).__mro__:
        family = _BY_CLASS.get(cls.__name__)
        if family is not None and _holds_its_moe(block, family):
            return family
    return None


def _holds_its_moe(block: nn.Module, family: Family) -> bool:
    """Whether ``block`` holds the MoE part its row's class promises.

    False for a decoder layer whose MoE is off (Gemma-4's ``enable_moe_block``) or
    swapped (its router is a stub), which the class alone would match.
    """
    router = getattr(block, family.router_attr, None)
    if router is None or family.inline is None:
        return router is not None
    return any(c.__name__ == family.router_class for c in type(router).__mro__)


def refusal_of(block: nn.Module) -> Refusal | None:
    """Why ``block``'s class is refused (by its class or a base class), or None."""
    by_class = {r.block_class: r for r in REFUSED}
    for cls in type(block).__mro__:
        if cls.__name__ in by_class:
            return by_class[cls.__name__]
    return None
