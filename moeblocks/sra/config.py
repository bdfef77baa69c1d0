"""Configuration of the reference SRA transformer and its training run.

Legend: V vocabulary, S sequence length, D model dim, H heads, L layers, E experts,
F expert hidden dim, K experts per token.

One short dataclass holds everything a run needs; presets scale it from a two-minute
CPU demo (``tiny``) to the official SRA code's Exp001 configuration (``paper``, with
``paper-linear`` its linear-router twin). Fields are plain JSON types so a config round
trips through ``config.json`` beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from moeblocks.runtime.errors import UsageError

__all__ = [
    "FAMILY_FFNS",
    "FFN_CHOICES",
    "PRESETS",
    "SRAConfig",
    "UsageError",
    "field_help",
    "fields_where",
    "preset",
]

FFNKind = Literal[
    "cosine",
    "linear",
    "dense",
    "mixtral",
    "qwen2_moe",
    "olmoe",
    "deepseek_v3",
    "gpt_oss",
    "switch",
    "llama4",
]
FFN_CHOICES: tuple[str, ...] = typing.get_args(FFNKind)
"""Every value ``SRAConfig.ffn`` takes: SRA's own three, then the family routing presets."""
FAMILY_FFNS: tuple[str, ...] = FFN_CHOICES[3:]
"""The routing presets of published MoE families (:mod:`moeblocks.sra.routing_presets`)."""
BalanceKind = Literal["bandpass", "cv", "switch", "none"]
ExpertKind = Literal["swiglu", "gelu", "gelu_tanh"]


def _field(default: Any, help: str, *, training_only: bool = False, resume: bool = False) -> Any:
    """A config field that carries its own metadata, read by the CLI, checkpoints and docs.

    Args:
        default: The field's value in :class:`SRAConfig` (and the ``tiny`` preset).
        help: What the field means, one line (``moeblocks train --help`` lists it).
        training_only: The field does not change the shape or meaning of the weights, so
            a checkpoint loads into a model whose config differs in it.
        resume: A resumed run may change the field (it does not alter what the run has
            trained so far).
    """
    meta = {"help": help, "training_only": training_only, "may_change_on_resume": resume}
    return dataclasses.field(default=default, metadata=meta)


def fields_where(key: str) -> frozenset[str]:
    """The names of the :class:`SRAConfig` fields whose metadata ``key`` is true.

    ``key`` is ``"training_only"`` or ``"may_change_on_resume"`` (see :func:`_field`).
    """
    return frozenset(f.name for f in dataclasses.fields(SRAConfig) if f.metadata[key])


def field_help(name: str) -> str:
    """The help text a :class:`SRAConfig` field carries."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(SRAConfig)}[name]


@dataclass(frozen=True)
class SRAConfig:
    """Model, routing, loss and training settings of one SRA run.

    The k curriculum and the warmup are given as fractions of ``steps`` so that
    shortening a run keeps its shape: the paper's "k rises after the 2nd of 8 epochs" is
    ``k_switch=0.25``, and its 4000 warmup steps of 25,296 are ``warmup=4000/25296``.
    """

    # --- model ---
    vocab_size: int = _field(2048, "V: BPE vocabulary trained on the training split")
    seq_len: int = _field(128, "S: tokens per training sequence (also the RoPE table length)")
    d_model: int = _field(128, "D: model width")
    n_layers: int = _field(2, "L: pre-LN decoder blocks")
    n_heads: int = _field(4, "H: attention heads, D must divide by H")
    ffn: FFNKind = _field(
        "cosine",
        "FFN of every block: cosine (SRA's cosine-routed MoE), linear (its linear-routed "
        "twin), dense (an MLP of the same active size), or the routing of a published "
        f"family at the same E, top-k and active parameters ({', '.join(FAMILY_FFNS)}; "
        "docs/sra.md, Routing presets). A family routes a fixed k and balances by its own "
        "published rule: it ignores k_start, k_switch, anchor_init, temperature and the "
        "balance and band fields, and refuses router_noise, z_loss_weight and "
        "dispersion_weight above 0",
    )
    expert: ExpertKind = _field(
        "swiglu", "expert MLP (also the dense FFN's); gelu_tanh as official"
    )
    expert_bias: bool = _field(False, "biases in the expert (and dense) MLPs, as the official code")
    attn_bias: bool = _field(False, "biases in the attention projections, as the official code")
    init: Literal["library", "gpt2"] = _field(
        "library",
        "expert/router init; gpt2: N(0, 0.02), output projections N(0, 0.02/sqrt(2L)), "
        "as the official code (dense parts: always gpt2)",
    )
    dropout: float = _field(0.0, "on embeddings, attention probabilities and expert hidden units")
    num_experts: int = _field(32, "E")
    d_expert: int = _field(64, "F: hidden width of one expert (the paper's d_ff)")
    dense_hidden: int = _field(
        0, "dense baseline's hidden width; 0 = k_final · F (same active params)"
    )
    # --- routing ---
    anchor_init: Literal["orthogonal", "kaiming", "batch"] = _field("orthogonal", "cosine anchors")
    temperature: float = _field(10.0, "initial τ of the cosine scorer")
    k_start: int = _field(1, "K at step 0 (cosine, linear; a family preset ignores it)")
    k_final: int = _field(
        2,
        "K after the switch; a family preset routes it from step 0 (switch, llama4: their "
        "published top-1, with wider experts of equal active size)",
    )
    k_switch: float = _field(
        0.25, "fraction of `steps` at which K rises to k_final", training_only=True
    )
    router_noise: float = _field(
        0.0, "std of training-time noise on router scores", training_only=True
    )
    dispatcher: Literal["auto", "torch", "triton"] = _field(
        "auto", "see moeblocks.make_dispatcher", training_only=True
    )
    # --- auxiliary losses (weights multiply the unweighted loss) ---
    balance: BalanceKind = _field(
        "bandpass", "SRA bandpass, SRA CV², Switch load balance, none", training_only=True
    )
    balance_weight: float = _field(0.4, "weight of the balance loss", training_only=True)
    aux_reduce: Literal["mean", "sum"] = _field("mean", "across layers: mean (official) or sum")
    band_floor: float = _field(
        0.004, "bandpass corridor on mean expert probability P_e;", training_only=True
    )
    band_ceiling: float = _field(
        0.032, "the paper's 0.0005/0.0040 for E=256, scaled by 256/E", training_only=True
    )
    z_loss_weight: float = _field(
        0.0, "ST-MoE z-loss on router logits (0 = off)", training_only=True
    )
    dispersion_weight: float = _field(
        0.0, "anchor dispersion (cosine router only; 0 = off)", training_only=True
    )
    # --- training ---
    steps: int = _field(
        600, "optimizer steps; sets the LR and k schedules", training_only=True, resume=True
    )
    batch_size: int = _field(16, "sequences per step", training_only=True)
    lr: float = _field(3e-3, "peak AdamW learning rate", training_only=True)
    min_lr_ratio: float = _field(0.1, "cosine decay ends at lr · min_lr_ratio", training_only=True)
    warmup: float = _field(0.08, "linear warmup, as a fraction of `steps`", training_only=True)
    weight_decay: float = _field(
        0.1, "on matrices only (not norms, biases, anchors, τ)", training_only=True
    )
    decay_embedding: bool = _field(False, "also decay the (tied) embedding, as the official code")
    precision: Literal["fp32", "bf16"] = _field("fp32", "bf16: autocast forward (GPU runs)")
    grad_clip: float = _field(1.0, "global gradient-norm clip (0 = off)", training_only=True)
    eval_every: int = _field(
        200, "steps between validation passes (0 = only at the end)", training_only=True
    )
    eval_tokens: int = _field(
        16384, "validation tokens per pass during training", training_only=True
    )
    ckpt_every: int = _field(
        200, "steps between checkpoints (0 = only at the end)", training_only=True
    )
    keep_checkpoints: int = _field(
        2,
        "verified checkpoints kept; older ones go once a newer verifies",
        training_only=True,
        resume=True,
    )
    max_skipped_steps: int = _field(
        3,
        "steps in a row skipped for a non-finite loss/grad: then stop",
        training_only=True,
        resume=True,
    )
    seed: int = _field(
        0, "model init and the data order (batch of step s depends on seed, s)", training_only=True
    )

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "seq_len",
            "d_model",
            "n_layers",
            "n_heads",
            "num_experts",
            "d_expert",
            "k_start",
            "k_final",
            "steps",
            "batch_size",
            "keep_checkpoints",
            "max_skipped_steps",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"config.{name} must be an int >= 1, got {value!r}")
        if self.vocab_size < 257:
            raise UsageError(
                f"config.vocab_size must be >= 257 (256 bytes + 1), got {self.vocab_size}"
            )
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise UsageError(
                f"config.d_model ({self.d_model}) must divide into n_heads ({self.n_heads}) "
                "heads of even width (RoPE rotates pairs)"
            )
        choices = {
            "ffn": FFN_CHOICES,
            "expert": ("swiglu", "gelu", "gelu_tanh"),
            "init": ("library", "gpt2"),
            "anchor_init": ("orthogonal", "kaiming", "batch"),
            "dispatcher": ("auto", "torch", "triton"),
            "balance": ("bandpass", "cv", "switch", "none"),
            "aux_reduce": ("mean", "sum"),
            "precision": ("fp32", "bf16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(
                    f"config.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if max(self.k_start, self.k_final) > self.num_experts:
            raise UsageError(
                f"config.k_final/k_start must be <= num_experts ({self.num_experts}), "
                f"got {self.k_start}, {self.k_final}"
            )
        if not 0.0 <= self.k_switch <= 1.0:
            raise UsageError(f"config.k_switch must be in [0, 1], got {self.k_switch}")
        if not 0.0 <= self.band_floor <= self.band_ceiling <= 1.0:
            raise UsageError(
                "config needs 0 <= band_floor <= band_ceiling <= 1, got "
                f"{self.band_floor}, {self.band_ceiling}"
            )
        for name in ("expert_bias", "attn_bias", "decay_embedding"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(
                    f"config.{name} must be true or false, got {getattr(self, name)!r}"
                )
        if isinstance(self.warmup, bool) or not 0.0 <= self.warmup <= 1.0:
            raise UsageError(
                f"config.warmup is a fraction of steps in [0, 1], got {self.warmup!r} "
                f"(for N warmup steps use N / steps)"
            )
        if not (math.isfinite(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise UsageError(f"config.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dense_hidden < 0 or self.eval_every < 0 or self.ckpt_every < 0:
            raise UsageError("config.dense_hidden, eval_every, ckpt_every must be >= 0")
        # Fields no preset sets (0 by default) that a family's own rule would drop: an
        # explicit value is refused rather than ignored.
        extra = [
            n for n in ("router_noise", "z_loss_weight", "dispersion_weight") if getattr(self, n)
        ]
        if self.ffn in FAMILY_FFNS and extra:
            raise UsageError(
                f"config.ffn={self.ffn!r} routes by its family's published rule; "
                f"{', '.join(extra)} apply to ffn cosine and linear only: set them to 0"
            )

    @property
    def k_switch_step(self) -> int:
        """The first step that uses ``k_final``."""
        return round(self.k_switch * self.steps)

    @property
    def warmup_steps(self) -> int:
        """Linear-warmup steps: ``round(warmup · steps)``."""
        return round(self.warmup * self.steps)

    @property
    def dense_width(self) -> int:
        """Hidden width of the dense FFN baseline (``k_final · d_expert`` unless set)."""
        return self.dense_hidden or self.k_final * self.d_expert

    def replace(self, **changes: Any) -> SRAConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SRAConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(
                f"config has unknown fields {unknown}; was it written by a newer moeblocks?"
            )
        return cls(**_upgrade(data))

    def differences(self, other: SRAConfig) -> list[str]:
        """Names of the fields whose values differ from ``other``'s."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A ``config.json`` of moeblocks 0.1 in today's terms (same run, same meaning)."""
    data = dict(data)
    if "aux_reduce" not in data:  # 0.1 summed the weighted aux losses over layers
        data["aux_reduce"] = "sum"
    warmup = data.get("warmup")
    if isinstance(warmup, int) and not isinstance(warmup, bool) and "steps" in data:
        data["warmup"] = warmup / data["steps"]  # 0.1 counted warmup in steps
    return data


# The official code's Exp001 recipe (ITernovtsii/semantic-resonance, commit 0ce43e7,
# etc/v2/experiments/001_multi_seed): 8 epochs of WikiText-103 in 25,296 steps of 128
# sequences of 256 tokens (255 inputs), 4000 warmup steps, cosine to 0.
_OFFICIAL_STEPS = 25296
_OFFICIAL_WARMUP = 4000 / _OFFICIAL_STEPS
_OFFICIAL_RECIPE: dict[str, Any] = {
    "expert": "gelu_tanh",
    "expert_bias": True,
    "attn_bias": True,
    "init": "gpt2",
    "aux_reduce": "mean",
    "min_lr_ratio": 0.0,
    "warmup": _OFFICIAL_WARMUP,
    "weight_decay": 0.01,
    "decay_embedding": True,
    "anchor_init": "batch",
    "k_start": 1,
    "k_final": 4,
    "k_switch": 0.25,
    "temperature": 10.0,
    "balance": "bandpass",
    "balance_weight": 0.4,
    "grad_clip": 1.0,
}


def _band(num_experts: int) -> dict[str, float]:
    # The paper's corridor (floor 0.0005, ceiling 0.0040 at E=256) relative to uniform
    # usage 1/E, so small presets keep the same pressure.
    return {"band_floor": 0.0005 * 256 / num_experts, "band_ceiling": 0.0040 * 256 / num_experts}


_PAPER = SRAConfig(
    **_OFFICIAL_RECIPE,
    vocab_size=32000,
    seq_len=255,
    d_model=512,
    n_layers=4,
    n_heads=8,
    num_experts=256,
    d_expert=256,
    dropout=0.1,
    steps=_OFFICIAL_STEPS,
    batch_size=128,
    lr=3e-4,
    eval_every=2000,
    eval_tokens=262144,
    ckpt_every=2000,
    band_floor=0.0005,
    band_ceiling=0.0040,
    precision="bf16",
    seed=19,
)

PRESETS: dict[str, SRAConfig] = {
    # A few minutes on a 2-core CPU: the `moeblocks demo` model. The official recipe's
    # shape (GELU experts with biases, GPT-2 init, mean aux over layers, warmup fraction,
    # cosine to 0, k 1→4 at a quarter), scaled down; no dropout: a CPU run sees each
    # token about once, so dropout would only slow it.
    "tiny": SRAConfig(
        **{**_OFFICIAL_RECIPE, "k_final": 2, "lr": 3e-3},
        d_expert=96,
        **_band(32),
    ),
    # A laptop-CPU hour or a few GPU minutes.
    "small": SRAConfig(
        **{**_OFFICIAL_RECIPE, "lr": 1.5e-3},
        vocab_size=8192,
        seq_len=256,
        d_model=256,
        n_layers=4,
        n_heads=4,
        num_experts=64,
        d_expert=192,
        steps=5000,
        batch_size=32,
        eval_every=500,
        eval_tokens=65536,
        ckpt_every=500,
        **_band(64),
    ),
    # The official Exp001 model and recipe (SRA B: cosine router, K=1→4 after the 2nd of
    # 8 epochs, bandpass 0.0005/0.0040 at 0.4 averaged over layers): 290,341,892
    # parameters, as the official run log counts. docs/sra.md lists what still differs.
    "paper": _PAPER,
    # Its linear-router twin (the official "StdMoE B"): a bias-free linear gate.
    "paper-linear": _PAPER.replace(ffn="linear"),
}


def preset(name: str) -> SRAConfig:
    """The named preset (``tiny``, ``small``, ``paper`` or ``paper-linear``).

    Raises:
        UsageError: For an unknown name.
    """
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]
