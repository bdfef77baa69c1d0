"""The bit-for-bit round trip every HF family test checks: ``to_hf(from_hf(block))``."""

from __future__ import annotations

import torch
from torch import nn

from moeblocks.hf import from_hf, to_hf


def assert_round_trip_bitwise(
    name: str, block: nn.Module, target: nn.Module, buffers: bool = True
) -> None:
    """Write ``from_hf(block)`` into ``target`` and check it equals ``block`` bit for bit.

    ``target`` is a block of the same class and shapes; every parameter (and buffer, with
    ``buffers``) is first moved away by 1, so a weight the mapping misses fails.
    """
    with torch.no_grad():
        for t in [*target.parameters(), *(target.buffers() if buffers else ())]:
            t.add_(1)  # different values everywhere
    to_hf(from_hf(block), target)
    for (key, a), (_, b) in zip(
        block.state_dict().items(), target.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), f"{name}: {key} not restored bit for bit"
