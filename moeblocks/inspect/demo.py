"""Knock-out demonstration on the synthetic corpus: experts that own a word class matter.

Legend: B batch, S sequence length, T tokens, E experts, C word classes.

:func:`class_knockout` trains a tiny one-layer SRA model (k = 1) on the synthetic
language of :mod:`moeblocks.sra.data` with one token per word, finds for every word
class the expert that receives most of its tokens (its *owner*), knocks that expert out
(:func:`~moeblocks.inspect.knockout`: its tokens are rerouted) and measures the
next-token loss on positions whose input word is of that class and on all others.
Imports :mod:`moeblocks.sra` inside the function, so the metric modules stay
model-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from moeblocks.inspect.collect import collect_routing, sra_forward
from moeblocks.inspect.interventions import knockout
from moeblocks.inspect.metrics import class_counts, purity

__all__ = ["ClassKnockout", "class_knockout", "format_class_knockout", "word_level_corpus"]


def word_level_corpus(num_sentences: int, seed: int) -> tuple[Tensor, Tensor, list[str]]:
    """The synthetic language as one token per word.

    Returns:
        Token ids ``[N]``, the class index of every token ``[N]``, and the class names.
    """
    from moeblocks.sra.data import WORD_CLASSES, synthetic_text

    words = sorted(WORD_CLASSES)
    classes = sorted(set(WORD_CLASSES.values()))
    vocab = {w: i for i, w in enumerate(words)}
    cls_of = torch.tensor([classes.index(WORD_CLASSES[w]) for w in words])
    ids = torch.tensor([vocab[w] for w in synthetic_text(num_sentences, seed).split()])
    return ids, cls_of[ids], classes


@dataclass(frozen=True)
class ClassKnockout:
    """Loss change when each class's owner expert is knocked out.

    Attributes:
        classes: Class names.
        owner: Per class, the expert receiving most of its tokens (top-1).
        owner_share: Per class, the fraction of its tokens that go to the owner.
        base_loss: Per class, mean next-token loss (nats) at positions whose input word
            has that class, without intervention.
        delta_own: Per class, the increase of that loss when its owner is knocked out.
        delta_other: Per class, the increase of the loss at all *other* positions.
        purity: Overall class purity of the experts (top-1), in [0, 1].
    """

    classes: list[str]
    owner: list[int]
    owner_share: list[float]
    base_loss: list[float]
    delta_own: list[float]
    delta_other: list[float]
    purity: float


def _position_losses(model: torch.nn.Module, x_BS: Tensor, y_BS: Tensor) -> Tensor:
    logits = model(x_BS).logits
    return F.cross_entropy(logits.flatten(0, 1), y_BS.flatten(), reduction="none")


def class_knockout(
    steps: int = 150, num_experts: int = 8, seed: int = 0, threads: int | None = 1
) -> ClassKnockout:
    """Train the tiny model and knock out each class's owner expert.

    Args:
        steps: AdamW steps of batch 32 × 32 tokens.
        num_experts: E.
        seed: Seed of the init and the batch order.
        threads: ``torch.set_num_threads`` for the call (None: leave as is); one thread
            is fastest for this tiny model on a shared CPU.
    """
    from moeblocks.sra.config import SRAConfig
    from moeblocks.sra.data import batch_at
    from moeblocks.sra.model import SRATransformer

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        train_ids, _, classes = word_level_corpus(3000, seed=11)
        val_ids, val_cls, _ = word_level_corpus(300, seed=12)
        cfg = SRAConfig(
            vocab_size=257, seq_len=32, d_model=32, n_layers=1, n_heads=2,
            num_experts=num_experts, d_expert=32, k_start=1, k_final=1, balance="cv",
            balance_weight=0.05, steps=steps,
        )  # fmt: skip
        model = SRATransformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        for step in range(steps):
            x_BS, y_BS = batch_at(train_ids, step, 32, cfg.seq_len, seed)
            out = model(x_BS)
            loss = F.cross_entropy(out.logits.flatten(0, 1), y_BS.flatten())
            opt.zero_grad(set_to_none=True)
            (loss + out.total_aux_loss()).backward()
            opt.step()
        model.eval()
        S = cfg.seq_len
        W = (len(val_ids) - 1) // S
        x_WS = val_ids[: W * S].view(W, S)
        y_WS = val_ids[1 : W * S + 1].view(W, S)
        cls_T: Int[Tensor, " T"] = val_cls[: W * S]
        with torch.no_grad():
            rs = collect_routing(sra_forward(model), [x_WS])
            counts_EC = class_counts(rs.layers[0], cls_T, len(classes))
            base_T = _position_losses(model, x_WS, y_WS)
            owner, share, base, d_own, d_other = [], [], [], [], []
            layer = model.moe_layers[0]
            for c in range(len(classes)):
                e = int(counts_EC[:, c].argmax())
                with knockout(layer, e):
                    ko_T = _position_losses(model, x_WS, y_WS)
                own = cls_T == c
                owner.append(e)
                share.append((counts_EC[e, c] / counts_EC[:, c].sum()).item())
                base.append(base_T[own].mean().item())
                d_own.append((ko_T[own] - base_T[own]).mean().item())
                d_other.append((ko_T[~own] - base_T[~own]).mean().item())
        return ClassKnockout(classes, owner, share, base, d_own, d_other, purity(counts_EC)[1])
    finally:
        torch.set_num_threads(old_threads)


def format_class_knockout(res: ClassKnockout) -> str:
    """Plain-text table of :func:`class_knockout`'s result."""
    lines = [
        f"class purity of experts (top-1): {res.purity:.3f}",
        "class          owner  share   loss   Δloss own   Δloss others",
    ]
    for i, name in enumerate(res.classes):
        lines.append(
            f"{name:<14} {res.owner[i]:5d}  {res.owner_share[i]:5.2f}  {res.base_loss[i]:5.2f}"
            f"   {res.delta_own[i]:+9.3f}   {res.delta_other[i]:+12.3f}"
        )
    return "\n".join(lines)
