"""Swap the sparse-MoE blocks of a loaded Hugging Face model for moeblocks layers, in place.

Legend: T tokens, D model dim, E experts, K experts per token.

:func:`swap_moe_blocks` replaces every supported block (see
:data:`~moeblocks.hf.SUPPORTED`) by an :class:`HFMoEBlock`: an adapter holding the
:class:`~moeblocks.MoELayer` that :func:`~moeblocks.hf.from_hf` builds, with the block's
forward signature and return convention, so the rest of the model runs unchanged and its
logits stay the same. :func:`unswap_moe_blocks` writes the layers back into the original
block classes (for ``save_pretrained``, say).

How ``output_router_logits=True`` keeps working
-----------------------------------------------
transformers records router logits with forward hooks that it installs, once per model,
on every submodule that ``isinstance`` the model's router class (``_can_record_outputs``
names it), reading ``output[index]``. A swapped block has no such router, so each
adapter owns a *logits tap*: a parameter-free child whose class is made once per HF
router class as a subclass of it (so the recorder's ``isinstance`` test matches) with its
own ``__init__`` and ``forward``. After every forward the adapter calls the tap with the
layer's ``Routing.scores``, cast to the dtype HF's router returns (the model dtype, or
float32 for routers that score in float32), and the tap returns them at the router's
``logits_index`` of a tuple (``None`` elsewhere). transformers then records, and its
``load_balancing_loss_func`` computes, exactly what it did before the swap, and the
aux loss backpropagates into the moeblocks router.

Why a tap: keeping the HF router module and calling it would hold a second copy of the
router weights that training would not keep in step (and score twice); editing
``_can_record_outputs`` would change a registry shared by every model of the class; and
appending to transformers' active collector would use its private context variable. The
tap relies only on what the recorder itself relies on: ``isinstance`` and
``output[index]``.

Hooks transformers had already installed (``model._output_capturing_hooks_installed``)
sit on the replaced router: the swap *moves* that router's forward hooks onto the tap,
and :func:`unswap_moe_blocks` moves the tap's forward hooks back, so no module is hooked
twice and none is missed, whenever transformers installed them. The tap sets
``_is_hf_initialized`` so transformers' weight initialisation skips it (it has no
weights). Other hooks on the replaced block or its submodules are dropped.

Decoder-inline MoE (Gemma-4, DiffusionGemma; rows with ``Family.inline``): the MoE part
is not a module of its own but attributes of the decoder layer. The swap keeps the
decoder layer and its forward, and replaces the part's submodules
(:class:`~moeblocks.hf.layouts.InlineForm`): the experts by an :class:`HFInlineMoE`
running the whole converted layer on the residual stream, the router by a stub, the dense
MLP by a zero and the norms by identities, so the layer computes ``x + layer(x)``. Its
tap returns what the HF router returned (Gemma-4: the float32 probabilities).

The original block object is kept, with its tensors moved to the ``meta`` device (no
memory), so :func:`unswap_moe_blocks` can rebuild it; a swapped model's ``state_dict``
holds moeblocks' parameter names. Taps pickle and deep-copy (they are rebuilt from their
HF router class), so a swapped model does as long as its hooks do.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeblocks.dispatch import Dispatcher
from moeblocks.hf.convert import SUPPORTED, Family, family_of, from_hf, to_hf
from moeblocks.layer import MoELayer

__all__ = ["HFInlineMoE", "HFMoEBlock", "swap_moe_blocks", "unswap_moe_blocks"]

_RETURNS = (
    "tensor",
    "tensor_and_weights",
    "flat_and_logits",
    "flat_and_flat_logits",
    "tensor_and_key_logits",
)


class _LogitsTap(nn.Module):
    """Base of the logits taps: returns its input at ``index`` of a tuple.

    Concrete tap classes derive from this *and* an HF router class (see
    :func:`_tap_class`); this class comes first in their MRO, so its methods win.
    """

    # transformers' _initialize_weights skips modules with this flag: a tap has no weights.
    _is_hf_initialized = True
    # family_of reads this: a tap of Doge derives from its block class, yet is no block.
    is_logits_tap = True

    def __init__(self, index: int) -> None:
        nn.Module.__init__(self)  # not the HF router's __init__ (it wants a config)
        self.index = int(index)

    def forward(self, logits: Tensor) -> tuple[Tensor | None, ...]:
        """``(None, …, logits)`` with the logits at ``index``, like the HF router's output."""
        return (None,) * self.index + (logits,)

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"index={self.index}"

    def __reduce_ex__(self, protocol: object) -> tuple:
        # A made class cannot be pickled by name: rebuild it from the HF router class
        # (importable) and restore the module's state (deepcopy takes this path too).
        return (_new_tap, (type(self)._router_class,), self.__dict__.copy())


_TAP_CLASSES: dict[type, type] = {}


def _tap_class(router_class: type) -> type:
    """The logits-tap class for one HF router class, made on first use and then reused."""
    cls = _TAP_CLASSES.get(router_class)
    if cls is None:
        name = f"{router_class.__name__}LogitsTap"
        namespace = {"__module__": __name__, "__qualname__": name, "_router_class": router_class}
        cls = type(name, (_LogitsTap, router_class), namespace)
        _TAP_CLASSES[router_class] = cls
    return cls


def _new_tap(router_class: type) -> nn.Module:
    """An empty tap instance (its state is restored by ``__setstate__``), for unpickling."""
    cls = _tap_class(router_class)
    return cls.__new__(cls)


def _move_forward_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Re-register ``src``'s forward hooks on ``dst`` (same flags, same order) and drop them."""
    for hid, hook in list(src._forward_hooks.items()):
        dst.register_forward_hook(
            hook,
            with_kwargs=hid in src._forward_hooks_with_kwargs,
            always_call=hid in src._forward_hooks_always_called,
        )
        del src._forward_hooks[hid]
        src._forward_hooks_with_kwargs.pop(hid, None)
        src._forward_hooks_always_called.pop(hid, None)


class HFMoEBlock(nn.Module):
    """An HF sparse-MoE block's stand-in: a moeblocks layer behind the block's interface.

    ``forward(hidden_states)`` runs ``self.layer`` and returns what the replaced block
    returned (``Family.returns``): the output in the input's shape (``"tensor"``), the
    output and the ``[T, K]`` combine weights (``"tensor_and_weights"``, GPT-OSS), or the
    output flattened to ``[T, D]`` and the ``[T, E]`` router logits
    (``"flat_and_logits"``, Llama-4), or both flattened to one dim
    (``"flat_and_flat_logits"``, ERNIE-4.5-VL, whose input may come flattened too), or
    the output and the ``[2, T, n]`` key logits of a product-key router
    (``"tensor_and_key_logits"``, Doge, whose block is the recorded module). It
    also calls ``self.logits_tap`` with the router logits so that
    ``output_router_logits=True`` records them (see the module docstring).
    The layer's own aux losses are not returned (the HF convention has no place for
    them); compute them from :func:`~moeblocks.hf.capture_routing` records instead.

    Interventions of :mod:`moeblocks.inspect` apply to ``self.layer`` as to any
    :class:`~moeblocks.MoELayer`.

    Args:
        layer: The layer computing the block (from :func:`~moeblocks.hf.from_hf`).
        family: The replaced block's :class:`~moeblocks.hf.Family`.
        router_class: The HF router class whose recorder the tap must match.
        original: The replaced block, kept (on the ``meta`` device) for
            :func:`unswap_moe_blocks`; None if it cannot be restored.
    """

    def __init__(
        self,
        layer: MoELayer,
        family: Family,
        router_class: type,
        original: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(layer, MoELayer):
            raise TypeError(f"layer must be a MoELayer, got {type(layer).__name__}")
        if family.returns not in _RETURNS:
            raise ValueError(f"family.returns must be one of {_RETURNS}, got {family.returns!r}")
        self.layer = layer
        self.logits_tap = _tap_class(router_class)(family.logits_index)
        self.family = family
        # Outside the module tree: not in state_dict, not moved by .to(), no parameters.
        self.__dict__["original"] = original

    def _logits(self, scores: Tensor, x: Tensor) -> Tensor:
        """Router logits as HF's router returns them: its dtype, its shape."""
        in_input_dtype = getattr(self.layer.router, "compute_dtype", "float32") == "input"
        logits = scores.to(x.dtype) if in_input_dtype else scores
        if self.family.batched_logits:
            logits = logits.reshape(*x.shape[:-1], logits.shape[-1])
        return logits

    def forward(
        self, hidden_states: Tensor, input_ids: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Run the layer; return what the replaced HF block returns (see the class doc).

        ``input_ids`` (DeepSeek-V4's decoder passes them to its MoE blocks) reach the
        layer as ``token_ids``, for a router that routes by token id.
        """
        flat = self.family.returns == "flat_and_flat_logits"
        if flat and hidden_states.ndim == 1:  # ERNIE-4.5-VL's split flattens the tokens
            hidden_states = hidden_states.reshape(-1, self.layer.dim)
        moe = self.layer(hidden_states, token_ids=input_ids)
        if self.family.returns == "tensor_and_key_logits":
            # Doge records its [2n]-wide key logits, laid out [2, T, n] (its pairing).
            tokens_TD = hidden_states.reshape(-1, self.layer.dim)
            keys = self.layer.router.get_submodule("scorer").key_logits(tokens_TD)
            logits = keys.reshape(2, tokens_TD.shape[0], -1)
            self.logits_tap(logits)
            return moe.out, logits
        logits = self._logits(moe.routing.scores, hidden_states)
        self.logits_tap(logits)
        out = moe.out
        if self.family.returns == "tensor_and_weights":
            return out, moe.routing.weights.to(out.dtype)
        if self.family.returns == "flat_and_logits":
            return out.reshape(-1, out.shape[-1]), logits
        return (out.flatten(), logits.flatten()) if flat else out

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        return f"family={self.family.name!r}, block={self.family.block_class}"


def _recorded(block: nn.Module, family: Family) -> nn.Module:
    """The module whose output transformers records: the router, or the block (Doge)."""
    if type(block).__name__ == family.router_class:
        return block
    return getattr(block, family.router_attr)


class _NoRouter(nn.Module):
    """Stands in for a decoder-inline MoE's HF router after a swap: the adapter routes."""

    _is_hf_initialized = True  # no weights for transformers to initialise

    def forward(self, hidden_states: Tensor) -> tuple[None, None, None]:
        """Nothing: the adapter in place of the experts routes and computes the MoE part."""
        return None, None, None


class _Zero(nn.Module):
    """Stands in for a branch the adapter now computes: returns zeros of its input's shape."""

    _is_hf_initialized = True

    def forward(self, x: Tensor) -> Tensor:
        """Zeros like ``x``."""
        return torch.zeros_like(x)


class _Identity(nn.Identity):
    """Stands in for a norm the adapter now computes."""

    _is_hf_initialized = True


class HFInlineMoE(HFMoEBlock):
    """The stand-in for a decoder layer's inline MoE part (Gemma-4), in place of its experts.

    The decoder layer keeps its attention and its forward; :func:`swap_moe_blocks`
    replaces the MoE part's submodules (see :class:`~moeblocks.hf.layouts.InlineForm`)
    so that the layer calls this adapter with the residual stream ``x`` ``[T, D]`` and
    adds its output back: ``x + layer(x)``. The router stub's outputs (None) arrive as
    ``top_k_index`` and ``top_k_weights`` and are ignored. The logits tap returns what
    the HF router returned at index 0 (Gemma-4: its float32 probabilities).
    """

    def forward(  # type: ignore[override]
        self,
        hidden_states: Tensor,
        top_k_index: Tensor | None = None,
        top_k_weights: Tensor | None = None,
    ) -> Tensor:
        """Run the layer on the residual ``hidden_states``; return the MoE part's output."""
        moe = self.layer(hidden_states)
        if self.family.inline.records == "probs":
            self.logits_tap(moe.routing.probs)
        else:
            self.logits_tap(self._logits(moe.routing.scores, hidden_states))
        return moe.out


def _swap_inline(decoder: nn.Module, family: Family, dispatcher: Dispatcher | None) -> None:
    """Put the adapter and the stubs of ``family.inline`` into ``decoder``, in place."""
    form = family.inline
    router = getattr(decoder, family.router_attr)
    layer = from_hf(decoder, dispatcher)
    names = (family.router_attr, form.adapter, *form.zero, *form.identity)
    originals = {n: getattr(decoder, n) for n in names}
    adapter = HFInlineMoE(layer, family, type(router), original=None)
    adapter.__dict__["originals"] = originals  # outside the module tree, as `original`
    adapter.train(decoder.training)
    _move_forward_hooks(router, adapter.logits_tap)
    setattr(decoder, family.router_attr, _NoRouter())
    setattr(decoder, form.adapter, adapter)
    for n in form.zero:
        setattr(decoder, n, _Zero())
    for n in form.identity:
        setattr(decoder, n, _Identity())
    for module in originals.values():
        module.to("meta")  # kept for unswap_moe_blocks, weights freed


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def swap_moe_blocks(model: nn.Module, dispatcher: Dispatcher | None = None) -> int:
    """Replace every supported HF sparse-MoE block in ``model`` by an :class:`HFMoEBlock`.

    In place. Each block becomes the :class:`~moeblocks.MoELayer` of
    :func:`~moeblocks.hf.from_hf` (same device, dtype and train/eval mode) behind the
    block's interface: the model's logits are unchanged, and ``output_router_logits=True``
    returns the same ``router_logits`` and ``aux_loss`` as before (see the module
    docstring for how). Swap before creating an optimizer: the parameters are new
    tensors. Known differences are those of :func:`~moeblocks.hf.from_hf` (training-mode
    jitter of Mixtral and Switch).

    Args:
        model: A transformers model (or any module containing supported blocks).
        dispatcher: Dispatcher of the new layers (default
            :class:`~moeblocks.TorchDispatcher`).

    Returns:
        The number of blocks swapped.

    Raises:
        ValueError: When ``model`` contains no supported block (the message lists the
            supported block classes), is itself a block (use ``from_hf`` for that), or
            holds a block whose family the swap refuses (``Family.no_swap``, NLLB-MoE).
    """
    if family_of(model) is not None:
        raise ValueError(
            f"model is itself a {type(model).__name__} block; swap_moe_blocks replaces blocks "
            "inside a model, use from_hf(block) to convert a single block"
        )
    found = [(name, m, family_of(m)) for name, m in model.named_modules()]
    blocks = [(name, m, f) for name, m, f in found if f is not None]
    if not blocks:
        swapped = any(isinstance(m, HFMoEBlock) for m in model.modules())
        raise ValueError(
            f"{type(model).__name__} contains no supported sparse-MoE block"
            + (" (its blocks are already swapped)" if swapped else "")
            + f"; supported block classes: {', '.join(SUPPORTED)}"
        )
    for name, _, family in blocks:
        if family.no_swap:  # checked before any block is replaced
            raise ValueError(
                f"swap_moe_blocks does not swap {family.block_class} (at {name!r}): "
                f"{family.no_swap}; convert its blocks one by one with from_hf"
            )
    for name, block, family in blocks:
        if family.inline is not None:
            _swap_inline(block, family, dispatcher)
            continue
        router = _recorded(block, family)
        layer = from_hf(block, dispatcher)
        adapter = HFMoEBlock(layer, family, type(router), original=block)
        adapter.train(block.training)
        _move_forward_hooks(router, adapter.logits_tap)
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, adapter)
        block.to("meta")  # keep the skeleton for unswap_moe_blocks, free the weights
    return len(blocks)


@torch.no_grad()
def _restore(adapter: HFMoEBlock) -> nn.Module:
    block = adapter.original
    if block is None:
        raise ValueError("this HFMoEBlock keeps no original block to restore")
    ref = next(adapter.layer.parameters())
    block.to_empty(device=ref.device)
    tensors = [*block.named_parameters(), *block.named_buffers()]
    for _, t in tensors:
        if t.is_floating_point():
            t.fill_(float("nan"))
    to_hf(adapter.layer, block)
    missed = [n for n, t in tensors if t.is_floating_point() and bool(torch.isnan(t).any())]
    if missed:
        raise RuntimeError(f"to_hf did not write {missed} of {type(block).__name__}")
    _move_forward_hooks(adapter.logits_tap, _recorded(block, adapter.family))
    return block.train(adapter.training)


@torch.no_grad()
def _restore_inline(adapter: HFInlineMoE, decoder: nn.Module) -> None:
    """Put a decoder layer's MoE-part submodules back, with the adapter's weights."""
    ref = next(adapter.layer.parameters())
    originals = adapter.__dict__["originals"]
    for name, module in originals.items():
        setattr(decoder, name, module.to_empty(device=ref.device))
    tensors = [t for m in originals.values() for t in (*m.parameters(), *m.buffers())]
    for t in tensors:
        if t.is_floating_point():
            t.fill_(float("nan"))
    to_hf(adapter.layer, decoder)
    if any(t.is_floating_point() and bool(torch.isnan(t).any()) for t in tensors):
        raise RuntimeError(f"to_hf did not write every MoE weight of {type(decoder).__name__}")
    _move_forward_hooks(adapter.logits_tap, getattr(decoder, adapter.family.router_attr))
    for module in originals.values():
        module.train(adapter.training)


def unswap_moe_blocks(model: nn.Module) -> int:
    """Put the original HF blocks back in place of every :class:`HFMoEBlock` in ``model``.

    The inverse of :func:`swap_moe_blocks`: each block gets the layer's current weights
    (:func:`~moeblocks.hf.to_hf`), on the layer's device, in the dtypes the block had
    when it was swapped. Hooks that transformers put on the logits tap move back to the
    block's router. A swapped model must be unswapped before ``save_pretrained`` to
    write a checkpoint transformers can load.

    Returns:
        The number of blocks restored.

    Raises:
        ValueError: When ``model`` contains no :class:`HFMoEBlock`.
    """
    adapters = [(n, m) for n, m in model.named_modules() if isinstance(m, HFMoEBlock)]
    if not adapters:
        raise ValueError(f"{type(model).__name__} contains no swapped block (HFMoEBlock)")
    for name, adapter in adapters:
        parent, leaf = _parent(model, name)
        if isinstance(adapter, HFInlineMoE):
            _restore_inline(adapter, parent)
        else:
            setattr(parent, leaf, _restore(adapter))
    return len(adapters)
