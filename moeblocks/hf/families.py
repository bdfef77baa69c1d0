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
    ALWAYS_ON_SIGMOID,
    BLOCK_BIAS_SIGMOID,
    BLOCK_MLP,
    BRANCH_NORMS,
    CLASSIFIER_SOFTMAX_BIASED,
    COHERE2,
    COHERE2_SHARED,
    CONCAT,
    CONCAT_CLAMPED,
    CONCAT_CLAMPED_AFTER,
    CONCAT_CLAMPED_LIMIT,
    CONCAT_CLAMPED_SWIGLU,
    CONCAT_GLU_FP32,
    CONCAT_IDENTITY,
    CONCAT_SOFT_CAPPED,
    DBRX,
    DEEPSEEK,
    DEEPSEEK_SCALED_AFTER,
    DEEPSEEK_V2,
    DEEPSEEK_V4,
    DEEPSEEK_ZERO_FILL,
    DOGE,
    ERGO,
    ERGO_EXPERTS,
    ERGO_SHARED,
    ERNIE,
    FUSED_CLAMPED_SWIGLU_SHARED,
    GATE_BIAS_SIGMOID,
    GATED_SHARED_EXPERT,
    GEMMA_INLINE,
    GPT_OSS,
    HY_V3,
    INTERLEAVED,
    JETMOE,
    JETMOE_EXPERTS,
    LATENT_MLP,
    LFM2,
    LLAMA4,
    LOGIT_BIAS_SIGMOID,
    MISTRAL4,
    MISTRAL_LARGE4,
    NO_SHARED,
    NORMED_DENSE_MLP,
    NORMED_SOFTMAX,
    OPTIONAL_SHARED_EXPERTS,
    OUT_NORM,
    OUTPUT_BIAS,
    PER_EXPERT,
    PER_EXPERT_FC,
    PHIMOE,
    PLAIN,
    RANK_ONE,
    ROUTER_BIAS_SIGMOID,
    ROUTER_WEIGHTED_SHARED,
    SHARED_EXPERT,
    SHARED_EXPERTS,
    SHARED_EXPERTS_CLAMPED,
    SHARED_EXPERTS_CLAMPED_AFTER,
    SHARED_EXPERTS_CLAMPED_LIMIT,
    SHARED_EXPERTS_MLP,
    SHARED_MLP,
    SIGMOID_TOPK,
    SOFT_CAPPED_SIGMOID,
    SOFTMAX,
    SOFTMAX_FP32_FLAG,
    SOFTMAX_NORM_FLAG,
    SOFTMAX_RAW,
    SOFTMAX_TOPK,
    SOFTMAX_TOPK_MODEL_DTYPE,
    SPLIT_ROWS,
    STACKED,
    SWITCH,
    TOP2_CAPACITY,
    WG_SOFTMAX,
    BankLayout,
    InlineForm,
    RouterForm,
    SharedForm,
    StructureForm,
    compose,
    scale_routed,
    unscale_routed,
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
            flattened to ``[T, D]`` and the ``[T, E]`` router logits) or
            ``"flat_and_flat_logits"`` (ERNIE-4.5-VL's modality blocks: both flattened
            to one dim, the input possibly so too) or ``"tensor_and_key_logits"`` (Doge:
            the output and the ``[2, T, n]`` key logits of its product-key router).
        logits_index: Index of the router logits in the router module's output tuple.
        batched_logits: Whether the router returns logits in the input's leading shape
            (``[B, S, E]``, Switch) rather than flattened to ``[T, E]``.
        hf_block_is_wrong: Empty, or what is wrong in transformers' block: the row then
            computes the published routing instead, and the tests compare it with a
            float64 reference of that routing rather than with the HF block.
        no_swap: Empty, or why :func:`~moeblocks.hf.swap_moe_blocks` refuses the class.
        experts_attr: Attribute of the block that holds the routed experts (``""``: the
            block itself, as Doge's ``down_embed`` / ``up_embed``).
        routed_scale: Attribute of the block holding a factor that multiplies the summed
            routed output after the experts, in the model dtype (the layer's bank is then
            a :class:`~moeblocks.ConstantScaledExperts`); None when there is none.
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
    hf_block_is_wrong: str = ""
    no_swap: str = ""
    experts_attr: str = "experts"
    routed_scale: str | None = None
    structure: StructureForm = PLAIN
    inline: InlineForm | None = None

    def build(self, block: nn.Module, dispatcher: Dispatcher) -> MoELayer:
        """The equivalent layer, with the block's weights (what :func:`from_hf` calls)."""
        layer = compose(
            block,
            self.router_attr,
            self.router,
            self.bank,
            self.shared,
            dispatcher,
            experts_attr=self.experts_attr,
        )
        if self.routed_scale is not None:
            layer = scale_routed(layer, block, self.routed_scale)
        return self.structure.read(layer, block)

    def write_back(self, layer: MoELayer, block: nn.Module) -> None:
        """Write a layer's weights into a block in place (what :func:`to_hf` calls)."""
        layer = self.structure.write(layer, block)
        self.router.write(layer.router, getattr(block, self.router_attr), block)
        bank = layer.experts
        if self.routed_scale is not None:
            bank = unscale_routed(layer, block, self.routed_scale)
        if self.bank.from_block or not self.experts_attr:
            experts = block
        else:
            experts = getattr(block, self.experts_attr)
        self.bank.write(bank, experts)
        self.shared.write(layer.shared, block)
        if self.bank.write_latent is not None:
            self.bank.write_latent(layer.latent, block)


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
    # NLLB-MoE, converted to the published top-2 routing (HF's block ignores it)
    Family(
        "nllb_moe",
        "NllbMoeSparseMLP",
        "NllbMoeTop2Router",
        TOP2_CAPACITY,
        PER_EXPERT_FC,
        router_attr="router",
        logits_index=2,
        hf_block_is_wrong=(
            "in transformers 5.25 NllbMoeExperts one-hots the router's [T, E] 0/1 top-1 "
            "mask instead of expert ids, so every token runs expert 1 with its top-1 gate "
            "and expert 0 with its top-2 gate, whatever the router chose; the row "
            "computes the router's own top-2 choice (its gates, capacity and dropping)"
        ),
        no_swap=(
            "its encoder and decoder layers pass a padding mask to the block (the router "
            "routes padding to no expert), which the swap adapter does not take"
        ),
    ),
    # exotic routing rules and split MoEs
    Family(
        "ernie4_5_moe",
        "Ernie4_5_MoeSparseMoeBlock",
        "Ernie4_5_MoeTopKRouter",
        ERNIE,
        CONCAT,
        OPTIONAL_SHARED_EXPERTS,
    ),
    Family("dbrx", "DbrxFFN", "DbrxRouter", DBRX, SPLIT_ROWS, router_attr="router"),
    Family(
        "phimoe", "PhimoeSparseMoeBlock", "PhimoeTopKRouter", PHIMOE, CONCAT, router_attr="router"
    ),
    Family(
        "doge",
        "DogeCDMoE",
        "DogeCDMoE",  # transformers records the block's own output (index 1)
        DOGE,
        RANK_ONE,
        BLOCK_MLP,
        router_attr="router_gate",
        returns="tensor_and_key_logits",
        logits_index=1,
        experts_attr="",
    ),
    Family(
        "ernie4_5_vl_moe",
        "Ernie4_5_VLMoeSparseMoeBlock",
        "Ernie4_5_VLMoeMoeTopKRouter",
        ERNIE,
        CONCAT,
        returns="flat_and_flat_logits",
    ),
    # soft-capped SwiGLU experts (Inkling2), parameter-free experts, router-weighted
    # shared experts.
    Family(
        "inkling2",
        "Inkling2SparseMoeBlock",
        "Inkling2TopKRouter",
        ROUTER_BIAS_SIGMOID,
        CONCAT_SOFT_CAPPED,
    ),
    Family(
        "inkling2_loop",
        "Inkling2LoopSparseMoeBlock",
        "Inkling2LoopTopKRouter",
        ROUTER_BIAS_SIGMOID,
        CONCAT_SOFT_CAPPED,
    ),
    Family(
        "longcat_flash",
        "LongcatFlashMoE",
        "LongcatFlashTopkRouter",
        CLASSIFIER_SOFTMAX_BIASED,
        CONCAT_IDENTITY,
        router_attr="router",
    ),
    Family("inkling", "InklingMoE", "InklingTopkRouter", ALWAYS_ON_SIGMOID, ROUTER_WEIGHTED_SHARED),
    # router parts and block conventions
    Family(
        "step3p7",
        "Step3p7SparseMoeBlock",
        "Step3p7TopKRouter",
        GATE_BIAS_SIGMOID,
        CONCAT_CLAMPED_AFTER,
        SHARED_EXPERTS_CLAMPED_AFTER,
        routed_scale="routed_scaling_factor",
    ),
    Family(
        "dots3_note_vision",
        "Dots3NoteVisionMoE",
        "Dots3NoteVisionTopKRouter",
        HY_V3,
        CONCAT,
    ),
    Family(
        "minimax_m3_vl",
        "MiniMaxM3VLSparseMoeBlock",
        "MiniMaxM3VLTopKRouter",
        GATE_BIAS_SIGMOID,
        CONCAT_CLAMPED_SWIGLU,
        FUSED_CLAMPED_SWIGLU_SHARED,
        routed_scale="routed_scaling_factor",
    ),
    Family(
        "laguna",
        "LagunaSparseMoeBlock",
        "LagunaTopKRouter",
        SOFT_CAPPED_SIGMOID,
        CONCAT,
        SHARED_EXPERTS,
        routed_scale="routed_scaling_factor",
    ),
    Family(
        "deepseek_v4",
        "DeepseekV4SparseMoeBlock",
        "DeepseekV4TopKRouter",
        DEEPSEEK_V4,
        CONCAT_CLAMPED_LIMIT,
        SHARED_EXPERTS_CLAMPED_LIMIT,
    ),
    Family(
        "beam",
        "BeamMoE",
        "BeamTopKRouter",
        DEEPSEEK_SCALED_AFTER,
        CONCAT_GLU_FP32,
        routed_scale="routed_scaling_factor",
    ),
    # layer structure around the experts
    Family(
        "jetmoe",
        "JetMoeMoE",
        "JetMoeTopKGating",
        JETMOE,
        JETMOE_EXPERTS,
        OUTPUT_BIAS,
        router_attr="router",
        logits_index=4,
    ),
    Family(
        "nemotron_h",
        "NemotronHMoE",
        "NemotronHTopkRouter",
        DEEPSEEK,
        LATENT_MLP,
        SHARED_EXPERTS_MLP,
    ),
    Family("ergo", "ErgoMoE", "ErgoTopkRouter", ERGO, ERGO_EXPERTS, ERGO_SHARED),
    # AXK-1's norm on the output, AXK-2's group-limited top-k filled with 0
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
    # decoder-inline MoE (the MoE part of a decoder layer, see Family.inline)
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


_NOT_REVIEWED = "not reviewed yet: its router or experts differ from every converted row"

REFUSED: tuple[Refusal, ...] = (
    Refusal(
        "jetmoe",
        "JetMoeAttention",
        "an attention layer, not an MoE block: its routed query and output projections are "
        "a RoutedLinear (equal to HF's around attention written out in "
        "tests/test_hf_jetmoe_moa.py), but moeblocks has no attention layer (kv projection, "
        "rotary embedding, cache, attention backends) for from_hf or swap_moe_blocks",
    ),
    Refusal(
        "jetmoe",
        "JetMoeMoA",
        "not a tokens-in, tokens-out block (its forward raises NotImplementedError): map and "
        "reduce are the two halves of a routed projection around attention; RoutedLinear "
        "(stock router and dispatcher, two LinearExperts) equals them, but from_hf returns "
        "an MoELayer",
    ),
    Refusal(
        "muse_spark",
        "MuseSparkMoE",
        "not converted: HF runs its post-expert RMS norm in float32 inside a float64 model, "
        "and its per-expert loop sums the gradient of that norm's shared scale in float32 "
        "expert by expert; a grouped bank sums it in another order (up to 1.1e-7 relative "
        "in float64, bound 1e-10). Its parts exist and match in float32 (3.5e-7): "
        "gating.ScaledScorer (output_multiplier), MoELayer(latent=LatentProjection(norm="
        "RMSNorm(offset=1))), NormedExperts(RMSNorm(offset=1, scale_first=True))",
    ),
    Refusal(
        "openai_privacy_filter",
        "OpenAIPrivacyFilterMLP",
        "its router, experts and combine run in float32 whatever the model dtype (inputs "
        "and weights upcast, the k weighted outputs summed in float32 in expert order, "
        "then rounded to the model dtype and multiplied by k): a layer computing in the "
        "model dtype differs in bfloat16 by bfloat16 rounding, and one computing in "
        "float32 would still sum the k outputs in slot order, so a float64 model differs "
        "by float32 rounding (~1e-7 at its k = 4), above the 1e-10 bound. The rest is "
        "stock: a biased float32 router, top-k of the logits, softmax over the k divided "
        "by k (what the block returns), GPT-OSS's clamped SwiGLU on a concatenated, "
        "biased layout",
    ),
    Refusal(
        "vitpose_backbone",
        "VitPoseBackboneMoeMLP",
        "not a routed MoE: the expert is chosen by the dataset index passed in",
    ),
    Refusal(
        "zaya",
        "ZayaSparseMoeBlock",
        "a cross-layer router state: from the second layer on, its router adds the previous "
        "layer's router hidden states (scaled per channel) to its own, and the block takes "
        "that state as a second input and returns the next one beside its output; a layer "
        "of moeblocks routes each token from its own input alone. (The rest would be an MLP "
        "scorer, not built: down-projection, RMSNorm, two biased GELU layers, output "
        "projection; then a softmax over E + 1 classes whose last, a skip expert, is a "
        "ZeroExperts.)",
    ),
)
"""Every routed MoE block class of the installed transformers that is not converted."""


def family_of(block: nn.Module) -> Family | None:
    """The :class:`Family` of an HF sparse-MoE block (by its class or a base class), or None."""
    if getattr(block, "is_logits_tap", False):  # a swap's tap may derive from a block class
        return None
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
