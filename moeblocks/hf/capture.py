"""Record the routing of every MoE layer of a Hugging Face model, swapped or not.

Legend: B batch, S sequence length, T = B·S tokens, E experts, K experts per token.

Inside ``with capture_routing(model) as rec:`` every forward of ``model`` appends one
:class:`~moeblocks.Routing` per MoE layer to ``rec.routings[name]`` (``name`` is the
block's qualified module name, the same before and after a swap), in call order:

- a swapped block (:class:`~moeblocks.hf.HFMoEBlock`) or any other
  :class:`~moeblocks.MoELayer`: the record the layer returns in its ``MoEOutput``;
- an unswapped HF block: a forward hook routes the block's input with a copy of its
  router, built by :func:`~moeblocks.hf.from_hf` when the context opens (in eval mode,
  sharing no tensor with the model, under ``torch.no_grad``), so the record equals
  HF's own decision for the weights the block had then.
- a decoder layer with its MoE part inline (Gemma-4): the same, with the hook on its
  router module, whose input is the MoE part's (the residual after attention, ``[T, D]``);
  swapped or not, it records under the decoder layer's name.

Every hook is removed when the context closes, also after an error. A module that runs
again in the backward pass (activation checkpointing) records again: capture in
``torch.no_grad`` or with checkpointing off.

The records feed :mod:`moeblocks.inspect` through a forward function
(``rec.forward_fn()``: ``ids_BS -> one Routing per layer``), which is what
:func:`~moeblocks.inspect.collect_routing` and the probes take::

    with capture_routing(model) as rec:
        rs = collect_routing(rec.forward_fn(), batches)  # a RoutingSet for every metric

:func:`hf_load_balance_loss` turns one forward's records into transformers' ``aux_loss``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from moeblocks.capacity import Capacity
from moeblocks.hf.convert import SUPPORTED, family_of, from_hf
from moeblocks.hf.swap import HFInlineMoE, HFMoEBlock
from moeblocks.layer import MoELayer
from moeblocks.losses import LoadBalanceLoss, TokenStats
from moeblocks.routing import MoEOutput, Routing

__all__ = ["RoutingRecorder", "capture_routing", "hf_load_balance_loss"]

ForwardFn = Callable[[Tensor], Sequence[Routing]]


class RoutingRecorder:
    """The records :func:`capture_routing` collects.

    Attributes:
        model: The captured model.
        routings: Per MoE layer (qualified module name, in module order), its records
            in call order: one per forward of the model.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model = model
        self.routings: dict[str, list[Routing]] = {n: [] for n in names}

    @property
    def layer_names(self) -> list[str]:
        """The captured layers' module names, in module (depth) order."""
        return list(self.routings)

    def clear(self) -> None:
        """Drop every record."""
        for records in self.routings.values():
            records.clear()

    def last(self) -> list[Routing]:
        """The newest record of every layer that has one, in depth order."""
        return [records[-1] for records in self.routings.values() if records]

    def forward_fn(self, call: Callable[[Tensor], object] | None = None) -> ForwardFn:
        """A forward function ``ids_BS -> one Routing per layer`` for :mod:`moeblocks.inspect`.

        Each call runs the model once and *takes* the records that forward added (they
        are removed from :attr:`routings`, so collecting many batches keeps no memory
        here), one per layer that ran, in depth order; rows are in flattened ``[B, S]``
        order as ``collect_routing`` expects.

        Args:
            call: How to run the model on ``ids_BS`` (default
                ``model(ids_BS.to(device))``; pass e.g. ``lambda ids: model(input_ids=ids,
                use_cache=False)``).

        Raises:
            ValueError: (from the returned function) when a layer ran more than once in
                one forward, so that one record per layer is ambiguous.
        """

        def forward(ids_BS: Int[Tensor, "B S"]) -> list[Routing]:
            before = {n: len(r) for n, r in self.routings.items()}
            if call is None:
                param = next(self.model.parameters(), None)
                device = ids_BS.device if param is None else param.device
                self.model(ids_BS.to(device))
            else:
                call(ids_BS)
            out = []
            for name, records in self.routings.items():
                new = records[before[name] :]
                del records[before[name] :]
                if len(new) > 1:
                    raise ValueError(
                        f"layer {name} ran {len(new)} times in one forward; a forward "
                        "function needs exactly one record per layer"
                    )
                out.extend(new)
            return out

        return forward


def _detached(r: Routing) -> Routing:
    return dataclasses.replace(
        r,
        scores=r.scores.detach(),
        probs=r.probs.detach(),
        experts=r.experts.detach(),
        weights=r.weights.detach(),
    )


def _layer_hook(store: list[Routing], detach: bool) -> Callable[..., None]:
    def hook(_module: nn.Module, _args: object, output: object) -> None:
        if isinstance(output, MoEOutput):
            store.append(_detached(output.routing) if detach else output.routing)

    return hook


def _block_hook(
    store: list[Routing], router: nn.Module, capacity: Capacity | None
) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple, kwargs: dict, _output: object) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        ids = kwargs.get("input_ids")  # DeepSeek-V4's hash layers route by token id
        # ERNIE-4.5-VL hands its modality blocks their tokens flattened to 1-D.
        batch = tuple(x.shape[:-1]) if x.shape[-1] == router.dim else (-1,)
        with torch.no_grad():
            tokens = x.detach().reshape(-1, router.dim)
            routing = router(tokens) if ids is None else router(tokens, token_ids=ids.reshape(-1))
            batch = (tokens.shape[0],) if batch == (-1,) else batch
            routing = dataclasses.replace(routing, batch_shape=batch)
            if capacity is not None:  # Switch: dropped copies, as HF drops them
                routing = capacity(routing)
        store.append(routing)

    return hook


def _router_copy(block: nn.Module) -> tuple[nn.Module, Capacity | None]:
    layer = from_hf(block)  # copies; only the router (and capacity) are kept
    router = layer.router.eval().requires_grad_(False)
    return router, layer.capacity


@contextmanager
def capture_routing(model: nn.Module, detach: bool = True) -> Iterator[RoutingRecorder]:
    """Record one :class:`~moeblocks.Routing` per MoE layer for every forward of ``model``.

    See the module docstring for what is recorded where. Records stay on the model's
    device; ``collect_routing`` moves them to the CPU.

    Args:
        model: A transformers model with supported sparse-MoE blocks (see
            :data:`~moeblocks.hf.SUPPORTED`), swapped or not, or any module containing
            :class:`~moeblocks.MoELayer` s.
        detach: Detach the records of moeblocks layers (swapped blocks). With False they
            keep their autograd graph (e.g. to train on a loss computed from them); the
            records of unswapped HF blocks never carry gradients.

    Yields:
        The :class:`RoutingRecorder`, filled as the model runs.

    Raises:
        ValueError: When ``model`` contains no supported block and no ``MoELayer``.
    """
    # (name, module hooked, router copy and capacity for an unswapped HF block, else None)
    plans: list[tuple[str, nn.Module, tuple[nn.Module, Capacity | None] | None]] = []
    inside: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, HFMoEBlock):
            inside.add(id(m.layer))
            # A decoder-inline adapter records under its decoder layer's name, as unswapped.
            key = name.rpartition(".")[0] if isinstance(m, HFInlineMoE) else name
            plans.append((key, m.layer, None))
        elif (family := family_of(m)) is not None:
            # Decoder-inline: the MoE part's input is its router's (the residual after
            # attention), not the decoder layer's.
            hooked = m if family.inline is None else getattr(m, family.router_attr)
            plans.append((name, hooked, _router_copy(m)))
        elif isinstance(m, MoELayer) and id(m) not in inside:
            plans.append((name, m, None))
    if not plans:
        raise ValueError(
            f"{type(model).__name__} contains no MoE layer to capture: no MoELayer and no "
            f"supported sparse-MoE block ({', '.join(SUPPORTED)})"
        )
    recorder = RoutingRecorder(model, [name for name, _, _ in plans])
    handles = []
    try:
        for name, module, copy in plans:
            store = recorder.routings[name]
            if copy is None:
                handles.append(module.register_forward_hook(_layer_hook(store, detach)))
            else:
                hook = _block_hook(store, *copy)
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield recorder
    finally:
        for h in handles:
            h.remove()


def hf_load_balance_loss(
    routings: Sequence[Routing], attention_mask: Int[Tensor, "B S"] | None = None
) -> Float[Tensor, ""]:
    """Hugging Face's ``aux_loss`` (``load_balancing_loss_func``) from captured records.

    With ``routings`` one record per MoE layer of one forward (e.g. ``rec.last()``) this
    is ``LoadBalanceLoss(fractions="tokens").from_stats(TokenStats.pooled(routings,
    masks))``: ``E · Σ_e f_e · P_e`` with the statistics pooled over all layers' tokens,
    ``f_e`` the fraction of (real) tokens choosing ``e`` (so ``Σ f = K``, K times the
    moeblocks default) and ``P_e`` the mean router probability. It equals HF's for
    routers whose probabilities are the softmax of the logits and whose choice is the
    top-k of them (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS); HF re-derives both from the
    logits, so for sigmoid or biased routers (DeepSeek-V3, GLM-4-MoE, Llama-4) HF's
    formula and this one differ.

    Args:
        routings: Records of the layers to pool (all with the same E).
        attention_mask: The forward's ``[B, S]`` attention mask (1 = real token); padding
            is left out, as HF does. None: every token counts.
    """
    masks = None
    if attention_mask is not None:
        masks = [attention_mask.reshape(-1).to(torch.bool) for _ in routings]
    stats = TokenStats.pooled(list(routings), masks)
    return LoadBalanceLoss(weight=1.0, fractions="tokens").from_stats(stats)
