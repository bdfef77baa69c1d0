"""The loop backend of grouped_mm given the group sizes already on the host (no sync).

Legend: R rows, E experts, I input dim, O output dim.
"""

from __future__ import annotations

import pytest
import torch

from moeblocks.grouped import grouped_mm


def _operands() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sizes_E = torch.tensor([2, 0, 3, 1])
    x_RI = torch.randn(6, 5, generator=gen)
    w_EIO = torch.randn(4, 5, 3, generator=gen)
    return x_RI, w_EIO, sizes_E


def test_host_sizes_give_the_same_result_without_reading_the_sizes(monkeypatch) -> None:
    x_RI, w_EIO, sizes_E = _operands()
    want = grouped_mm(x_RI, w_EIO, sizes_E, backend="loop")

    def no_read(self: torch.Tensor) -> list:
        raise AssertionError("group_sizes_E was read back with tolist()")

    # tolist() is the host read (a device sync on a GPU); with host_sizes it must not run.
    monkeypatch.setattr(torch.Tensor, "tolist", no_read)
    got = grouped_mm(x_RI, w_EIO, sizes_E, backend="loop", host_sizes=[2, 0, 3, 1])
    monkeypatch.undo()
    # The same matmuls on the same rows: bitwise equal.
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("host_sizes", "match"),
    [
        ([2, 0, 4], r"host_sizes must hold one size per expert \(4\), got 3"),
        ([2, 0, 3, 2], r"group_sizes_E must be >= 0 and sum to R = 6"),
        ([3, 0, 2, 1], r"host_sizes must equal group_sizes_E .* got \[3, 0, 2, 1\] against"),
    ],
)
def test_wrong_host_sizes_are_named(host_sizes: list[int], match: str) -> None:
    x_RI, w_EIO, sizes_E = _operands()
    with pytest.raises(ValueError, match=match):
        grouped_mm(x_RI, w_EIO, sizes_E, backend="loop", host_sizes=host_sizes)
