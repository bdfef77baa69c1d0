"""Auxiliary-loss-free load balancing (DeepSeek-V3): a selection-only bias per expert.

Legend: T tokens, E experts, K experts per token.

The router adds ``bias[e]`` to the selection key of expert ``e`` (never to the combine
weights), and counts how many routed slots each expert receives. Once per optimizer
step, :meth:`BiasBalancer.step` moves every bias by a fixed rate towards balance:

``bias[e] += rate · sign(mean_e(load) − load[e])``

so an overloaded expert becomes less attractive and an underloaded one more. The loads
are summed over the data/expert-parallel ``group`` first when one is given, so every rank
applies the same update.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from jaxtyping import Float, Int
from torch import Tensor, nn

from moeblocks._checks import check_expert_ids, check_index, check_same_device

__all__ = ["BiasBalancer", "balancers", "step_balancers"]


class BiasBalancer(nn.Module):
    """A selection-only bias per expert, updated by the sign rule of DeepSeek-V3.

    State (both in the ``state_dict``): ``bias`` (float32 ``[E]``, the selection bias)
    and ``load`` (float32 ``[E]``, routed slots counted since the last :meth:`step`).

    Args:
        num_experts: Number of experts E.
        rate: Bias update speed γ per step (DeepSeek-V3: 0.001). 0 freezes the bias,
            e.g. for a converted pretrained model.
        group: Process group whose loads are summed before each update (data or expert
            parallel); None updates from the local loads.
        sync_checks: Also range-check the expert ids :meth:`observe` gets on a GPU, at
            one device sync per call (CPU ids are always checked).
    """

    bias: Tensor
    load: Tensor

    def __init__(
        self,
        num_experts: int,
        rate: float = 1e-3,
        group: dist.ProcessGroup | None = None,
        *,
        sync_checks: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate >= 0):
            raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
        self.num_experts = num_experts
        self.rate = float(rate)
        self.group = group
        self.sync_checks = bool(sync_checks)
        self.register_buffer("bias", torch.empty(num_experts))
        self.register_buffer("load", torch.empty(num_experts))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero the bias and the loads, in place."""
        self.bias.zero_()
        self.load.zero_()

    @torch.no_grad()
    def observe(self, experts: Int[Tensor, "T K"]) -> None:
        """Add the slots of one routing decision to ``load`` (the router calls this).

        Raises:
            TypeError: If ``experts`` is not an integer tensor.
            ValueError: If ``experts`` is not ``[T, K]``, is on another device than the
                balancer, or holds an id outside ``[0, num_experts)`` (checked on CPU
                always, on a GPU with ``sync_checks=True``).
        """
        check_index(experts, "experts", 2)
        check_same_device(experts, "experts", self.load, "the balancer's load buffer")
        check_expert_ids(experts, self.num_experts, self.sync_checks)
        flat = experts.reshape(-1)
        self.load.index_add_(0, flat, torch.ones_like(flat, dtype=self.load.dtype))

    @torch.no_grad()
    def step(self) -> Float[Tensor, " E"]:
        """Apply one bias update from the loads seen since the last step; reset them.

        Call it once per optimizer step (after gradient accumulation). Collective when
        ``group`` is set: every rank of the group must call it.

        Returns:
            The (group-summed) loads the update used.
        """
        load = self.load.clone()
        if self.group is not None:
            dist.all_reduce(load, group=self.group)
        self.bias.add_(self.rate * torch.sign(load.mean() - load))
        self.load.zero_()
        return load

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"num_experts={self.num_experts}, rate={self.rate}"


def balancers(model: nn.Module) -> Iterator[BiasBalancer]:
    """Every :class:`BiasBalancer` in ``model``, in module order."""
    for module in model.modules():
        if isinstance(module, BiasBalancer):
            yield module


def step_balancers(model: nn.Module) -> int:
    """Call :meth:`BiasBalancer.step` on every balancer of ``model``; returns how many.

    Put it next to ``optimizer.step()`` in a training loop.
    """
    count = 0
    for balancer in balancers(model):
        balancer.step()
        count += 1
    return count
