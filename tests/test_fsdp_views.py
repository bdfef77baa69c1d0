"""FSDP2 units return no view tensors: an in-place op after a block keeps every gradient.

Legend: B batch, S sequence, D model dim, E experts.

FSDP2 registers its pre-backward hook (the all-gather before a unit's backward) on every
tensor a unit returns, and an in-place op on a returned *view* drops it. ``MoELayer``
returns ``out`` as a view (``[T, D]`` reshaped to the input's shape), so every block
holding one triggered FSDP2's "returned a view tensor" warning on every distributed run,
and code that updates ``moe.out`` in place after the block (a real pattern: scaling a
residual branch) was exposed. ``parallelize`` now gives each unit's view outputs their
own storage. One rank of gloo in this process (a FileStore, no port) shows both: no
warning, and after an in-place op on ``moe.out`` outside the block the gradients equal
those of the same model without FSDP2 (before the fix that backward failed). Without
shared experts ``out`` is a view of a custom autograd function's output, and autograd
itself refuses the in-place op, loudly.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import moeblocks as mb
from moeblocks.distributed import ParallelConfig, local_shard, parallelize

D, E = 8, 4


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        router = mb.Router(mb.LinearScorer(D, E), 2)
        losses = {"balance": mb.LoadBalanceLoss()}
        # With shared experts ``out`` is a view of an ordinary sum, which autograd lets
        # code update in place (a view of the dispatcher's output alone it refuses to).
        shared = mb.SharedExperts(mb.MLPExperts(1, D, 16))
        bank = mb.MLPExperts(E, D, 16)
        self.moe = mb.MoELayer(router, mb.TorchDispatcher(), bank, losses, shared=shared)

    def forward(self, x: Tensor) -> tuple[Tensor, mb.MoEOutput]:
        moe = self.moe(self.norm(x))
        return x + moe.out, moe


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x, moe = block(x)
        moe.out.mul_(0.5)  # in place, after the last unit has returned it
        # The gradient enters the last unit through moe.out alone: were FSDP2's hook
        # dropped, its parameters would stay freed (resharded after forward) and the
        # backward fail (measured: "setStorage ... out of bounds for storage of size 0").
        return moe.out.square().mean()


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: local_shard(p.grad).clone() for n, p in model.named_parameters()}


def test_fsdp_units_return_no_views_and_in_place_ops_keep_gradients(tmp_path: Path) -> None:
    if dist.is_initialized():
        pytest.skip("needs to own the default process group")
    torch.manual_seed(0)
    reference = _Toy()
    model = copy.deepcopy(reference)
    x = torch.randn(2, 5, D)
    reference(x).backward()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        pm = parallelize(model, ParallelConfig(engine="fsdp"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm.module(x).backward()
        views = [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]
        assert not views, views[0]
        got = _grads(model)
    finally:
        dist.destroy_process_group()
    want = _grads(reference)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        # One rank: FSDP2 runs the same float32 ops; only its gradient divide (by 1) differs.
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-7, msg=name)
