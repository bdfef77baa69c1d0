"""One SRA training step on random tokens, as the CPU benchmarks time it (imports torch)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeblocks.sra.config import preset
from moeblocks.sra.model import SRATransformer
from moeblocks.sra.train import build_optimizer


def training_step(preset_name: str, batch_size: int | None = None) -> Callable[[], None]:
    """A closure running one full step of ``preset_name`` (batch: the preset's, or given).

    Forward at ``k_final``, cross-entropy + aux losses, backward, gradient clipping and
    AdamW, on one fixed batch of random token ids (seed 0).
    """
    cfg = preset(preset_name)
    if batch_size is not None:
        cfg = cfg.replace(batch_size=batch_size)
    torch.manual_seed(0)
    model = SRATransformer(cfg)
    optimizer = build_optimizer(model, cfg)
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len))
    y = torch.roll(x, -1, dims=1)

    def step() -> None:
        res = model(x, k=cfg.k_final)
        ce = F.cross_entropy(res.logits.flatten(0, 1), y.flatten())
        (ce + res.total_aux_loss()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
