"""An MoE layer where a tensor is expected, and the aux losses collected explicitly.

Legend: D model dim.

:class:`~moeblocks.layer.MoELayer` returns an :class:`~moeblocks.routing.MoEOutput`. In a
block you write, take ``res.out`` and return ``res.aux_losses`` to the caller (the
"``.out`` idiom" of the docs' *Your own model* page). Where the slot only takes a
``tensor -> tensor`` module (``nn.Sequential``, a block of someone else's library),
:class:`TensorMoE` returns ``.out`` alone, and :func:`collect_aux_losses` hands back the
aux losses of every layer of one forward: it hooks the layers for the length of a
``with`` block and keeps the losses in the object it yields. Nothing is kept on a module
or in a global, and a training forward whose losses nobody collects is an error, not a
silent loss of the balancing terms.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from moeblocks.layer import MoELayer
from moeblocks.routing import MoEOutput

__all__ = ["AuxLosses", "TensorMoE", "collect_aux_losses"]


class TensorMoE(nn.Module):
    """An :class:`~moeblocks.layer.MoELayer` that returns its output tensor only.

    For ``nn.Sequential`` and other places that pass one tensor from module to module.
    The layer's aux losses reach the training loop through :func:`collect_aux_losses`;
    in training mode a layer with losses refuses to run outside it.

    Args:
        layer: The wrapped layer, kept as ``self.layer`` (its parameters and state dict
            keys sit under ``layer.``).
    """

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        if not isinstance(layer, MoELayer):
            raise TypeError(f"layer must be an MoELayer, got {type(layer).__name__}")
        self.layer = layer

    def forward(self, x: Float[Tensor, "*batch D"]) -> Float[Tensor, "*batch D"]:
        """``layer(x).out``.

        Raises:
            RuntimeError: In training mode, when the layer has aux losses and no
                :func:`collect_aux_losses` collects them.
        """
        has_losses = len(self.layer.losses) + len(self.layer.plain_losses) > 0
        # A collector is a forward hook on the layer (torch keeps them in _forward_hooks).
        if self.training and has_losses and not self.layer._forward_hooks:
            raise RuntimeError(
                "TensorMoE in training mode drops the layer's aux losses "
                f"({', '.join([*self.layer.losses, *self.layer.plain_losses])}) unless the "
                "forward runs inside `with moeblocks.collect_aux_losses(model) as aux:`; "
                "add aux.total() to the loss (or call .eval() for inference)"
            )
        return self.layer(x).out


class AuxLosses:
    """The aux losses of every :class:`~moeblocks.layer.MoELayer` call in one ``with`` block.

    Attributes:
        calls: One ``{name: weighted loss}`` dict per layer call, in call order.
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Tensor]] = []

    def total(self) -> Float[Tensor, ""]:
        """Sum of every weighted aux loss of every call (a float zero when none ran)."""
        values = [v for call in self.calls for v in call.values()]
        return torch.stack(values).sum() if values else torch.zeros(())

    def by_name(self) -> dict[str, Float[Tensor, ""]]:
        """Each loss name summed over the calls (over layers, for one forward)."""
        out: dict[str, Tensor] = {}
        for call in self.calls:
            for name, value in call.items():
                out[name] = out[name] + value if name in out else value
        return out


@contextmanager
def collect_aux_losses(model: nn.Module) -> Iterator[AuxLosses]:
    """Collect the aux losses of every MoE layer of ``model`` while the block runs.

    Example:
        >>> with collect_aux_losses(model) as aux:  # doctest: +SKIP
        ...     loss = task_loss(model(x)) + aux.total()

    The hooks are removed when the block ends, also on an error.

    Raises:
        ValueError: If ``model`` holds no :class:`~moeblocks.layer.MoELayer`.
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"model holds no MoELayer: {type(model).__name__}")
    aux = AuxLosses()

    def keep(module: nn.Module, args: Any, result: MoEOutput) -> None:
        aux.calls.append(dict(result.aux_losses))

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        yield aux
    finally:
        for handle in handles:
            handle.remove()
