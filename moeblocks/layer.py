"""MoELayer: router + dispatcher + expert bank (+ capacity, shared experts) + aux losses.

Legend: T tokens (all leading dims flattened), D model dim, E experts, K experts per
token, R grouped rows.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Mapping
from types import MappingProxyType

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from moeblocks._checks import check_index, value_checks, warn_non_finite
from moeblocks.capacity import Capacity
from moeblocks.dispatch import Dispatcher
from moeblocks.experts import ExpertBank
from moeblocks.losses import AuxLoss, DispersionLoss
from moeblocks.routers import RouterProtocol
from moeblocks.routing import Layout, MoEOutput, Routing
from moeblocks.schedules import KSchedule
from moeblocks.shared import SharedExperts

__all__ = ["MoELayer"]


def _routes(router: nn.Module) -> bool:
    """Whether ``router.forward`` takes ``(tokens, k=...)``, as a router's does.

    The protocol's attributes alone do not tell a router from a scorer (both have
    ``dim``, ``num_experts`` and a ``forward``): the call's shape does, without calling it.
    """
    try:
        params = inspect.signature(router.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: trust the protocol
        return True
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    return any(p.name == "k" and p.kind is not p.POSITIONAL_ONLY for p in params)


def _takes_router(loss: AuxLoss) -> bool:
    """Whether a loss has the 0.1 signature ``(routing, router, mask)`` (deprecated)."""
    fn = loss.forward if isinstance(loss, nn.Module) else loss
    try:
        return "router" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the current form
        return False


def _row_weights(routing: Routing, layout: Layout) -> Float[Tensor, "R 1"]:
    """The routing weight of every grouped row (0 on padding rows)."""
    slot_R = layout.slot_of_row
    w_R = routing.weights.reshape(-1).index_select(0, slot_R.clamp(min=0))
    return w_R.masked_fill(slot_R < 0, 0).unsqueeze(1)


def _flat_ids(token_ids: object, x: Tensor) -> Tensor:
    """``token_ids`` flattened to ``[T]``, after checking it has ``x``'s leading shape."""
    ids = check_index(token_ids, "token_ids")
    if ids.shape != x.shape[:-1] or ids.device != x.device:
        raise ValueError(
            f"token_ids must be an integer tensor of shape {tuple(x.shape[:-1])} on "
            f"{x.device}, got {tuple(ids.shape)} on {ids.device}"
        )
    return ids.reshape(-1)


def _check_latent(latent: object, dim: int) -> int:
    """The latent dim of a ``latent=`` module, after checking its shape against ``dim``."""
    if not isinstance(latent, nn.Module) or not all(
        hasattr(latent, a) for a in ("dim", "latent", "down", "up")
    ):
        raise TypeError(
            "latent must be an nn.Module with dim, latent, down(tokens) and up(combined) "
            f"(a LatentProjection), got {type(latent).__name__}"
        )
    if latent.dim != dim:
        raise ValueError(f"latent has dim {latent.dim}, the router {dim}")
    return latent.latent


def _check_shared(shared: object, dim: int) -> None:
    """``shared`` is None or SharedExperts of the router's dim."""
    if shared is not None:
        if not isinstance(shared, SharedExperts):
            raise TypeError(f"shared must be SharedExperts, got {type(shared).__name__}")
        if shared.dim != dim:
            raise ValueError(f"shared experts have dim {shared.dim}, the router {dim}")


def _check_norms(
    latent: object, routed_input_norm: object, routed_norm: object, out_norm: object
) -> None:
    """The layer's norms are modules, and no branch norm comes with a latent space."""
    norms = {"routed_input_norm": routed_input_norm, "routed_norm": routed_norm}
    for name, norm in {**norms, "out_norm": out_norm}.items():
        if norm is not None and not isinstance(norm, nn.Module):
            raise TypeError(f"{name} must be None or an nn.Module, got {type(norm).__name__}")
    branch_norms = [name for name, norm in norms.items() if norm is not None]
    if latent is not None and branch_norms:
        # Before or after the projection? Each reading is a different model.
        raise ValueError(
            f"{' and '.join(branch_norms)} cannot be combined with latent: it is ambiguous "
            "whether the norm acts in the model dim or the latent dim; put a norm on the "
            "projected tokens in the LatentProjection (norm=), or use out_norm"
        )


def _check_losses(losses: object) -> dict[str, AuxLoss]:
    """``losses`` as a dict, or a ``TypeError`` that shows the expected form."""
    if losses is not None and not isinstance(losses, Mapping):
        raise TypeError(
            "losses must be a mapping of names to AuxLoss, e.g. "
            f"{{'balance': LoadBalanceLoss()}}, got {type(losses).__name__}"
        )
    losses = dict(losses or {})
    for name, loss in losses.items():
        if not isinstance(name, str) or not isinstance(loss, AuxLoss):
            raise TypeError(f"losses must map str names to AuxLoss, got {name!r}: {loss!r}")
    return losses


class MoELayer(nn.Module):
    """A mixture-of-experts feed-forward layer composed from independent blocks.

    ``forward`` flattens the leading dims into tokens, routes them, applies the capacity
    limit if any, groups the routed copies by expert, runs the expert bank, combines the
    outputs with the routing weights, adds the shared experts' output and restores the
    input shape. Nothing is kept on ``self`` between calls.

    Loading weights: ``load_state_dict`` takes NaN or inf router weights without a word
    (as every PyTorch module does), and every output is NaN after. Check loaded weights
    with ``torch.isfinite`` where they come from outside; the SRA checkpoint loader
    (:func:`moeblocks.sra.checkpoint.load_weights`) refuses them, naming the tensor.

    Args:
        router: Chooses experts and combine weights: any ``nn.Module`` satisfying
            :class:`~moeblocks.routers.RouterProtocol` (the stock
            :class:`~moeblocks.Router` or your own).
        dispatcher: Groups routed copies by expert and combines them back.
        experts: The expert bank; its ``dim`` and ``num_experts`` must match the router.
        losses: Named auxiliary losses ``(routing, mask) -> scalar``; each value is
            multiplied by the loss's ``weight``. A :class:`~moeblocks.DispersionLoss`
            without a source is replaced by a copy that reads this layer's router. A loss
            with the 0.1 signature ``(routing, router, mask)`` still gets the router, with
            a ``DeprecationWarning`` here (for one release).
        check_finite: Raise ``ValueError`` on NaN or inf in the input. This reads a flag
            on the host (one device sync per call), so it is off by default. Without it,
            on CPU, aux losses made NaN or inf by such an input give a one-time
            ``RuntimeWarning`` naming the layer (no check on a GPU: it would cost a sync;
            check the aux values where they come to the host for logging, e.g. with
            ``moeblocks._checks.warn_non_finite``, as the SRA trainer does).
        shared: Always-on experts added to the routed output
            (:class:`~moeblocks.shared.SharedExperts`).
        capacity: A per-expert :class:`~moeblocks.capacity.Capacity`; overflow copies
            are dropped (weight 0) and marked in ``Routing.dropped``.
        weight_inputs: Multiply each routed copy's *input* by its weight and sum the
            expert outputs unweighted (Llama-4), instead of weighting the outputs.
        latent: Run the routed experts in a smaller space: a
            :class:`~moeblocks.latent.LatentProjection` (or any module with ``dim``,
            ``latent``, ``down(tokens)`` and ``up(combined)``) projects the tokens down
            after routing and the combined output back (NemotronH, MuseSpark); the
            router and the shared experts see the model-dim tokens, the bank has
            ``dim == latent.latent``.
        routed_input_norm: A module applied to the tokens ``[T, D]`` the routed experts
            see (not the router, not the shared experts): Gemma-4's
            ``pre_feedforward_layernorm_2``. Not with ``latent`` (whose own ``norm``
            acts on the projected tokens).
        routed_norm: A module applied to the combined routed output ``[T, D]`` before
            the shared output is added (Gemma-4's norm on its routed branch). Not with
            ``latent``.
        out_norm: A module applied to the layer's output ``[T, D]``, after the shared
            output is added (AXK-1's and Gemma-4's norm on the MoE output).
    """

    def __init__(
        self,
        router: RouterProtocol,
        dispatcher: Dispatcher,
        experts: ExpertBank,
        losses: Mapping[str, AuxLoss] | None = None,
        check_finite: bool = False,
        *,
        shared: SharedExperts | None = None,
        capacity: Capacity | None = None,
        weight_inputs: bool = False,
        latent: nn.Module | None = None,
        routed_norm: nn.Module | None = None,
        out_norm: nn.Module | None = None,
        routed_input_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (
            not isinstance(router, nn.Module)
            or not isinstance(router, RouterProtocol)
            or not _routes(router)
        ):
            raise TypeError(
                "router must be an nn.Module with dim, num_experts and "
                f"forward(tokens, k=None) -> Routing, got {type(router).__name__}"
                + (" (a scorer? wrap it in a Router)" if hasattr(router, "num_experts") else "")
            )
        if not isinstance(dispatcher, Dispatcher):
            raise TypeError(
                f"dispatcher must implement permute/unpermute, got {type(dispatcher).__name__}"
            )
        if not isinstance(experts, nn.Module) or not isinstance(experts, ExpertBank):
            raise TypeError(
                f"experts must be an nn.Module expert bank, got {type(experts).__name__}"
            )
        routed_dim = router.dim if latent is None else _check_latent(latent, router.dim)
        if experts.dim != routed_dim or experts.num_experts != router.num_experts:
            raise ValueError(
                f"experts (dim={experts.dim}, num_experts={experts.num_experts}) do not match "
                f"router (dim={router.dim}, num_experts={router.num_experts})"
                + ("" if latent is None else f" with latent dim {routed_dim}")
            )
        _check_shared(shared, router.dim)
        _check_norms(latent, routed_input_norm, routed_norm, out_norm)
        if capacity is not None and not isinstance(capacity, Capacity):
            raise TypeError(f"capacity must be a Capacity, got {type(capacity).__name__}")
        losses = _check_losses(losses)
        for name, loss in losses.items():
            if isinstance(loss, DispersionLoss) and loss.source is None:
                losses[name] = loss.bind(router)
        self._router_losses = frozenset(n for n, f in losses.items() if _takes_router(f))
        if self._router_losses:
            warnings.warn(
                f"losses {sorted(self._router_losses)} take (routing, router, mask), which is "
                "deprecated and will be removed in the next release; take (routing, mask) "
                "and any module state at construction",
                DeprecationWarning,
                stacklevel=2,
            )
        self.router = router
        self.dispatcher = dispatcher
        self.experts = experts
        self.shared = shared
        self.capacity = capacity
        self.weight_inputs = bool(weight_inputs)
        self.latent = latent
        self.routed_input_norm = routed_input_norm
        self.routed_norm = routed_norm
        self.out_norm = out_norm
        self.losses = nn.ModuleDict({n: f for n, f in losses.items() if isinstance(f, nn.Module)})
        # Losses that are plain callables are kept outside the module tree.
        self._plain_losses = {n: f for n, f in losses.items() if not isinstance(f, nn.Module)}
        self.check_finite = bool(check_finite)
        # The non-finite warning is shown once per layer: a plain flag, not Python's warning
        # registry, whose once-per-location rule breaks when a wrapper (jaxtyping < 0.3)
        # calls forward from a new frame each time. Not a buffer: not in the state dict.
        self._warned_non_finite = False

    @property
    def plain_losses(self) -> Mapping[str, AuxLoss]:
        """The aux losses that are plain callables, kept outside the module tree.

        Module losses are in ``self.losses`` (an ``nn.ModuleDict``, so they move with
        ``.to()`` and appear in ``state_dict``).
        """
        return MappingProxyType(self._plain_losses)

    @property
    def dim(self) -> int:
        """Model dimension D."""
        return self.router.dim

    @property
    def num_experts(self) -> int:
        """Number of experts E."""
        return self.router.num_experts

    def _label(self) -> str:
        """How warnings name this layer (a module does not know its name in a model)."""
        return f"MoELayer(dim={self.dim}, num_experts={self.num_experts}) at 0x{id(self):x}"

    def _validate(self, x: Tensor, mask: Tensor | None) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.ndim < 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"x must have shape [*batch, {self.dim}] with at least one batch dim, "
                f"got {tuple(x.shape)}"
            )
        param = next(self.experts.parameters(), None)
        if param is not None and param.device != x.device:
            raise ValueError(f"x is on {x.device} but the layer's parameters are on {param.device}")
        if param is not None and param.dtype != x.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the expert weights are {param.dtype}; "
                "cast the layer or the input so they match"
            )
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != x.shape[:-1]:
                raise ValueError(
                    f"mask must be a bool tensor of shape {tuple(x.shape[:-1])}, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            if mask.device != x.device:
                raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf (check_finite=True)")

    def _check_routing(self, routing: Routing, num_tokens: int) -> None:
        # Shapes only (no sync): a custom router's record must fit this layer.
        if not isinstance(routing, Routing):
            raise TypeError(f"the router must return a Routing, got {type(routing).__name__}")
        if routing.num_tokens != num_tokens or routing.num_experts != self.num_experts:
            raise ValueError(
                f"the router returned a Routing for {routing.num_tokens} tokens and "
                f"{routing.num_experts} experts, expected {num_tokens} tokens and "
                f"{self.num_experts} experts"
            )

    def _routed(self, tokens_TD: Tensor, routing: Routing) -> Tensor:
        """Dispatch every slot of ``routing``, run the experts, combine."""
        grouped_RD, layout = self.dispatcher.permute(tokens_TD, routing)
        combine_TK = routing.weights
        if self.weight_inputs:
            grouped_RD = grouped_RD * _row_weights(routing, layout).to(grouped_RD.dtype)
            kept_TK = torch.ones_like(combine_TK)
            combine_TK = (
                kept_TK if routing.dropped is None else kept_TK.masked_fill(routing.dropped, 0)
            )
        expert_out_RD = self.experts(grouped_RD, layout.group_sizes)
        return self.dispatcher.unpermute(expert_out_RD, layout, combine_TK)

    def _real_slots_only(self, tokens_TD: Tensor, routing: Routing) -> Tensor:
        """Dynamic k: dispatch the real slots alone, as N one-slot rows, and sum back.

        Sizing the N real slots reads the slot mask on the host (one device sync).
        """
        slots_TK = routing.slots
        token_N = torch.arange(routing.num_tokens, device=slots_TK.device)
        token_N = token_N.unsqueeze(1).expand_as(slots_TK)[slots_TK]
        N, E = token_N.shape[0], routing.num_experts
        # The dispatcher reads experts and weights only: stride-0 views stand for scores.
        blank_NE = routing.scores.new_zeros(()).expand(N, E)
        real = Routing(
            blank_NE,
            blank_NE,
            routing.experts[slots_TK].unsqueeze(1),
            routing.weights[slots_TK].unsqueeze(1),
        )
        out_ND = self._routed(tokens_TD.index_select(0, token_N), real)
        # Back to [T, K] then a sum in slot order: deterministic, no atomics.
        out_TKD = out_ND.new_zeros(*slots_TK.shape, out_ND.shape[-1])
        out_TKD[slots_TK] = out_ND
        return out_TKD.sum(1)

    def _routed_branch(self, tokens_TD: Tensor, routing: Routing) -> Tensor:
        """The routed experts' output: the tokens into the experts' space, routed, back."""
        if self.latent is not None:
            routed_in = self.latent.down(tokens_TD)
        elif self.routed_input_norm is not None:
            routed_in = self.routed_input_norm(tokens_TD)
        else:
            routed_in = tokens_TD
        if routing.slots is None:
            out_TD = self._routed(routed_in, routing)
        else:
            out_TD = self._real_slots_only(routed_in, routing)
        if self.latent is not None:
            return self.latent.up(out_TD)
        return out_TD if self.routed_norm is None else self.routed_norm(out_TD)

    def forward(
        self,
        x: Float[Tensor, "*batch D"],
        k: int | None = None,
        mask: Bool[Tensor, "*batch"] | None = None,
        *,
        token_ids: Int[Tensor, "*batch"] | None = None,
    ) -> MoEOutput:
        """Apply the layer.

        Args:
            x: Input of any leading shape; zero tokens give an empty output.
            k: Experts per token; ``None`` takes the router's schedule.
            mask: True for real tokens; padding is left out of the auxiliary losses
                (it is still routed, so the output shape is unchanged).
            token_ids: Each token's id in the vocabulary, for a router that routes by
                id (:class:`~moeblocks.gating.HashSelection`); passed to the router
                only when given.

        Returns:
            :class:`~moeblocks.routing.MoEOutput` with the output, the weighted aux
            losses and the routing record.
        """
        self._validate(x, mask)
        tokens_TD = x.reshape(-1, self.dim)
        mask_T = None if mask is None else mask.reshape(-1)
        if mask_T is not None and self.training and getattr(self.router, "needs_seed", False):
            self.router.seed_from(tokens_TD[mask_T])  # once per model: padding is no anchor
        schedule = getattr(self.router, "schedule", None)
        if self.training and k is None and isinstance(schedule, KSchedule):
            schedule.note_training_use()  # warns once if nobody steps a curriculum
        if token_ids is None:
            routing = self.router(tokens_TD, k=k)
        else:
            routing = self.router(tokens_TD, k=k, token_ids=_flat_ids(token_ids, x))
        self._check_routing(routing, tokens_TD.shape[0])
        routing = dataclasses.replace(routing, batch_shape=tuple(x.shape[:-1]))
        if self.capacity is not None:
            if routing.slots is not None:
                raise ValueError("a capacity limit does not apply to a dynamic-k routing")
            routing = self.capacity(routing)
        out_TD = self._routed_branch(tokens_TD, routing)
        if self.shared is not None:
            out_TD = out_TD + self.shared(tokens_TD)
        if self.out_norm is not None:
            out_TD = self.out_norm(out_TD)
        all_losses = {**dict(self.losses.items()), **self._plain_losses}
        aux = {
            name: loss.weight
            * (
                loss(routing, self.router, mask_T)
                if name in self._router_losses
                else loss(routing, mask_T)
            )
            for name, loss in all_losses.items()
        }
        if not (self.check_finite or self._warned_non_finite) and value_checks(
            tokens_TD, sync_checks=False
        ):
            self._warned_non_finite = warn_non_finite(
                aux, f"{self._label()} (losses {sorted(aux)})"
            )
        return MoEOutput(out_TD.reshape(x.shape), aux, routing)
