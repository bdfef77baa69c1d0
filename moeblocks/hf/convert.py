"""Convert Hugging Face sparse-MoE blocks to moeblocks layers and back.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.

Each supported block class is a row of :data:`~moeblocks.hf.families.FAMILIES`: how to
read its router, experts and shared experts into an :class:`~moeblocks.MoELayer`
composed from stock blocks, and how to write the weights back (the parts of a row are in
:mod:`moeblocks.hf.layouts`). Nothing here imports transformers: blocks are recognised
by class name (their own or a base class's), so this module also serves a model loaded
by an installed transformers of another version, as long as the weight layout matches.
A block class that is known but refused (:data:`~moeblocks.hf.families.REFUSED`) gets a
``TypeError`` that says why.
"""

from __future__ import annotations

from torch import nn

from moeblocks.dispatch import Dispatcher, TorchDispatcher
from moeblocks.hf.families import SUPPORTED, Family, family_of, refusal_of
from moeblocks.layer import MoELayer

__all__ = ["SUPPORTED", "Family", "family_of", "from_hf", "is_moe_block", "to_hf"]


def is_moe_block(module: nn.Module) -> bool:
    """Whether ``module`` is a sparse-MoE block that :func:`from_hf` converts."""
    return family_of(module) is not None


def _family(block: nn.Module) -> Family:
    family = family_of(block)
    if family is None:
        refusal = refusal_of(block)
        why = "" if refusal is None else f" ({refusal.family}: {refusal.reason})"
        raise TypeError(
            f"from_hf/to_hf do not convert {type(block).__name__}{why}; supported block "
            f"classes: {', '.join(SUPPORTED)}"
        )
    return family


def from_hf(block: nn.Module, dispatcher: Dispatcher | None = None) -> MoELayer:
    """An :class:`~moeblocks.MoELayer` that computes what ``block`` computes.

    The weights are copied (the HF block is left untouched), on the block's device and
    in its dtype. Outputs, routing and gradients match the block in eval mode; in
    training mode the jitter differs where the block perturbs the experts' input too
    (Mixtral, and Switch whose in-place jitter reaches its experts in float32; DBRX
    and PhiMoE, whose in-place jitter reaches theirs; moeblocks' jitter only reaches
    the router). PhiMoE's SparseMixer samples in training mode: under the same torch
    seed the layer draws the same numbers and matches the block. A converted
    DeepSeek-V3-style router (DeepSeek-V3, GLM-4-MoE and the rows that share their
    router) keeps its selection bias in a :class:`~moeblocks.balancing.BiasBalancer`
    with ``rate=0``; raise the rate to keep balancing it while training.

    Args:
        block: A sparse-MoE block of a supported family (see :data:`SUPPORTED`).
        dispatcher: The dispatcher of the new layer (default
            :class:`~moeblocks.TorchDispatcher`).

    Raises:
        TypeError: For a block class that is not supported; the message says why
            (for a class of :data:`~moeblocks.hf.families.REFUSED`) and lists the
            supported ones.
    """
    family = _family(block)
    layer = family.build(block, TorchDispatcher() if dispatcher is None else dispatcher)
    return layer.train(block.training)


def to_hf(layer: MoELayer, block: nn.Module) -> None:
    """Write ``layer``'s weights into ``block`` in place (the inverse of :func:`from_hf`).

    ``to_hf(from_hf(block), block)`` leaves every weight bit for bit as it was.

    Raises:
        TypeError: For an unsupported block class, or a layer whose expert bank has
            another type than the family needs.
        ValueError: When a weight shape differs.
    """
    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a MoELayer, got {type(layer).__name__}")
    _family(block).write_back(layer, block)
