"""One SRA training step on random tokens, as the CPU benchmarks time it (imports torch)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeblocks.balancing import step_balancers
from moeblocks.sra.config import SRAConfig
from moeblocks.sra.model import SRATransformer
from moeblocks.sra.train import build_optimizer


def make_step(config: SRAConfig, k: int | None) -> Callable[[], None]:
    """One full training step of a fresh model on a fixed random batch.

    Forward at ``k`` experts per token (None: the config's schedule), cross-entropy +
    aux losses, backward, gradient clipping, AdamW and any bias balancer's update, as the
    trainer does; the model and the batch of
    random token ids come from seed 0.
    """
    torch.manual_seed(0)
    model = SRATransformer(config)
    optimizer = build_optimizer(model, config)
    x = torch.randint(0, config.vocab_size, (config.batch_size, config.seq_len))
    y = torch.roll(x, -1, dims=1)

    def step() -> None:
        res = model(x, k=k)
        ce = F.cross_entropy(res.logits.flatten(0, 1), y.flatten())
        (ce + res.total_aux_loss()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step_balancers(model)  # as the trainer does (DeepSeek-V3's bias; else nothing)
        optimizer.zero_grad(set_to_none=True)

    return step
