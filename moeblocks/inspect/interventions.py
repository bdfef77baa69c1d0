"""Interventions on a trained MoE layer, as wrappers: no core module is edited.

Forbid or force experts, knock one out, change k, scale one expert's output.

Legend: T tokens, E experts, K experts per token, R grouped rows, D model dim.

:class:`EditedRouter` wraps a :class:`~moeblocks.Router` and edits its scores and its
selection through ``Router.with_parts`` (no copy of a part, no hook in the router);
:class:`ScaledExperts` wraps an expert bank and multiplies the output rows of chosen
experts. :func:`intervene` swaps them into an
:class:`~moeblocks.MoELayer` for the duration of a ``with`` block and always restores
the original modules.

Defined behaviour of :class:`EditedRouter` for the *selected* tokens (all tokens unless
``tokens`` is given; the others are routed exactly as by the original router):

- ``forbid``: the experts' scores are set to ``-inf``, so their probability is 0 and
  they are never chosen; the softmax renormalises over the rest.
- ``force`` with ``len(force) >= k``: only forced experts are allowed (every other
  score is ``-inf``); the k most probable of them are chosen. With one forced expert and
  k = 1 its weight is therefore 1.
- ``force`` with ``len(force) < k``: every forced expert is chosen, the remaining
  ``k − len(force)`` slots take the most probable other allowed experts, and the
  weights are the chosen probabilities renormalised to sum to 1.
- ``k``: overrides the schedule *and* any k passed to the call.

The recorded ``Routing.scores`` are the edited scores (``-inf`` where masked), so
``probs = softmax(scores)`` still holds; chosen experts stay ordered by probability.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from moeblocks.experts import ExpertBank
from moeblocks.gating import Selection
from moeblocks.layer import MoELayer
from moeblocks.routers import Router
from moeblocks.routing import Routing
from moeblocks.schedules import KSchedule

__all__ = ["EditedRouter", "ScaledExperts", "intervene", "knockout", "token_mask"]


def _expert_set(name: str, experts: Iterable[int], E: int) -> tuple[int, ...]:
    out = tuple(int(e) for e in experts)
    bad = [e for e in out if not 0 <= e < E]
    if bad:
        raise ValueError(f"{name} must hold expert indices in [0, {E}), got {bad}")
    return out


def token_mask(ids: Int[Tensor, "*batch"], token_ids: Iterable[int]) -> Bool[Tensor, " T"]:
    """Flattened mask of the positions whose id is one of ``token_ids`` (for ``tokens=``)."""
    wanted = torch.tensor(sorted({int(i) for i in token_ids}), dtype=ids.dtype, device=ids.device)
    return torch.isin(ids.reshape(-1), wanted)


class _MaskedScorer(nn.Module):
    """A scorer whose scores are ``-inf`` where ``masked_TE`` is True."""

    def __init__(self, base: nn.Module, masked_TE: Bool[Tensor, "T E"]) -> None:
        super().__init__()
        self.base = base
        self.dim, self.num_experts = base.dim, base.num_experts
        self.masked_TE = masked_TE

    def forward(self, tokens: Float[Tensor, "T D"]) -> Float[Tensor, "T E"]:
        """The base scores with the masked cells at ``-inf``."""
        return self.base(tokens).masked_fill(self.masked_TE, float("-inf"))


class _ForcedFirst:
    """A selection that ranks the forced cells above all others, then defers to ``base``."""

    def __init__(self, base: Selection, forced_TE: Bool[Tensor, "T E"]) -> None:
        self.base = base
        self.forced_TE = forced_TE

    def check(self, num_experts: int, max_k: int) -> None:
        """As the base selection."""
        self.base.check(num_experts, max_k)

    def __call__(self, key: Float[Tensor, "T E"], k: int) -> Int[Tensor, "T K"]:
        """Lift the forced experts' keys above every finite key; keep their order."""
        finite = key.masked_fill(~torch.isfinite(key), 0)
        lift = 2 * finite.abs().amax() + 1 if finite.numel() else 1.0
        return self.base(torch.where(self.forced_TE, key + lift, key), k)


class EditedRouter(nn.Module):
    """A router that forbids / forces experts for selected tokens or fixes k.

    See the module docstring for the exact behaviour. It wraps ``base`` (no copy): each
    call routes through ``base.with_parts(...)`` with a scorer that masks the forbidden
    scores and a selection that ranks the forced experts first, so every parameter and
    the k schedule are the original ones and the core router has no hook for this.

    Args:
        base: The router to edit (a stock :class:`~moeblocks.Router`).
        forbid: Experts never chosen for the selected tokens.
        force: Experts always chosen for the selected tokens (disjoint from ``forbid``).
        tokens: Flattened mask of the selected tokens, matching the T of the next calls;
            None selects every token.
        k: Experts per token, overriding the schedule and any call-time k.
    """

    def __init__(
        self,
        base: Router,
        forbid: Iterable[int] = (),
        force: Iterable[int] = (),
        tokens: Bool[Tensor, " T"] | None = None,
        k: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, Router):
            raise TypeError(f"base must be a Router, got {type(base).__name__}")
        self.base = base
        self.train(base.training)
        E = self.num_experts
        self.forbid = _expert_set("forbid", forbid, E)
        self.force = _expert_set("force", force, E)
        if set(self.forbid) & set(self.force):
            raise ValueError(
                f"forbid and force must be disjoint, both hold {set(self.forbid) & set(self.force)}"
            )
        if len(set(self.forbid)) >= E:
            raise ValueError(f"forbid must leave at least one of the {E} experts allowed")
        self.k_override = None if k is None else base.check_k(k)
        if tokens is not None and (tokens.dtype != torch.bool or tokens.ndim != 1):
            raise ValueError(
                f"tokens must be a 1-D bool mask, got {tokens.dtype} {tuple(tokens.shape)}"
            )
        self.tokens = tokens

    @property
    def dim(self) -> int:
        """Token dimension D."""
        return self.base.dim

    @property
    def num_experts(self) -> int:
        """Number of experts E."""
        return self.base.num_experts

    @property
    def schedule(self) -> KSchedule:
        """The base router's k schedule."""
        return self.base.schedule

    def _selected(self, T: int, device: torch.device) -> Bool[Tensor, "T 1"]:
        if self.tokens is None:
            return torch.ones(T, 1, dtype=torch.bool, device=device)
        if self.tokens.shape[0] != T:
            raise ValueError(
                f"the tokens mask has {self.tokens.shape[0]} entries but this call routes {T} "
                "tokens; build the mask for the flattened batch of the call"
            )
        return self.tokens.to(device).reshape(T, 1)

    def forward(
        self,
        tokens: Float[Tensor, "T D"],
        k: int | None = None,
        *,
        token_ids: Int[Tensor, " T"] | None = None,
    ) -> Routing:
        """Route tokens with the edits applied (see the module docstring).

        ``token_ids`` go to the base router's selection as in
        :meth:`~moeblocks.Router.forward` (a swapped DeepSeek-V4 block passes them).
        """
        if self.k_override is not None:
            k = self.k_override
        k = self.base.schedule.k if k is None else self.base.check_k(k)
        T, E, dev = tokens.shape[0], self.num_experts, tokens.device
        sel_T1 = self._selected(T, dev)
        forbid_E = torch.zeros(E, dtype=torch.bool, device=dev)
        forbid_E[list(self.forbid)] = True
        force_E = torch.zeros(E, dtype=torch.bool, device=dev)
        force_E[list(self.force)] = True
        masked_E = forbid_E | (~force_E if len(self.force) >= k else torch.zeros_like(force_E))
        allowed = E - int(masked_E.sum())
        if allowed < k:
            raise ValueError(
                f"the edits leave {allowed} allowed experts for the selected tokens, "
                f"fewer than k={k}"
            )
        edited = self.base.with_parts(
            scorer=_MaskedScorer(self.base.scorer, sel_T1 & masked_E),
            selection=_ForcedFirst(self.base.selection, sel_T1 & force_E),
        )
        r = edited(tokens, k, token_ids=token_ids)
        gates_TK = r.probs.gather(1, r.experts)
        order_TK = gates_TK.sort(dim=-1, descending=True, stable=True).indices
        return Routing(
            r.scores, r.probs, r.experts.gather(1, order_TK), r.weights.gather(1, order_TK)
        )

    def extra_repr(self) -> str:
        """Shown in the module's repr."""
        sel = "all" if self.tokens is None else int(self.tokens.sum())
        return f"forbid={self.forbid}, force={self.force}, tokens={sel}, k={self.k_override}"


class ScaledExperts(nn.Module):
    """Expert bank wrapper: multiplies the output rows of chosen experts by a factor.

    ``out[r] = scale[e(r)] · base(grouped, group_sizes)[r]`` where ``e(r)`` is the expert
    owning grouped row ``r``; unlisted experts keep factor 1. A factor of 0 silences an
    expert while leaving the routing (and the other experts' weights) unchanged.

    Args:
        base: The expert bank.
        scales: ``{expert: factor}``.
    """

    def __init__(self, base: ExpertBank, scales: Mapping[int, float]) -> None:
        super().__init__()
        self.base = base
        self.num_experts = base.num_experts
        self.dim = base.dim
        scale_E = torch.ones(self.num_experts)
        for e in _expert_set("scales", scales.keys(), self.num_experts):
            scale_E[e] = float(scales[e])
        self.register_buffer("scale_E", scale_E, persistent=False)

    def forward(
        self, grouped: Float[Tensor, "R D"], group_sizes: Int[Tensor, " E"]
    ) -> Float[Tensor, "R D"]:
        """Run the wrapped bank, then scale each expert's rows."""
        out_RD = self.base(grouped, group_sizes)
        expert_R = torch.repeat_interleave(
            torch.arange(self.num_experts, device=grouped.device),
            group_sizes,
            output_size=grouped.shape[0],
        )
        return out_RD * self.scale_E.to(out_RD.device, out_RD.dtype)[expert_R].unsqueeze(-1)


@contextmanager
def intervene(
    layer: MoELayer,
    forbid: Iterable[int] = (),
    force: Iterable[int] = (),
    tokens: Bool[Tensor, " T"] | None = None,
    k: int | None = None,
    scales: Mapping[int, float] | None = None,
) -> Iterator[MoELayer]:
    """Apply interventions to ``layer`` inside a ``with`` block, then restore it.

    Args:
        layer: The MoE layer (edited in place, restored on exit even after an error).
        forbid: See :class:`EditedRouter`.
        force: See :class:`EditedRouter`.
        tokens: See :class:`EditedRouter`.
        k: See :class:`EditedRouter`.
        scales: ``{expert: factor}`` for :class:`ScaledExperts`.

    Yields:
        The edited layer.
    """
    router, experts = layer.router, layer.experts
    try:
        forbid, force = tuple(forbid), tuple(force)
        if forbid or force or k is not None:
            layer.router = EditedRouter(router, forbid, force, tokens, k)
        if scales:
            layer.experts = ScaledExperts(experts, scales)
        yield layer
    finally:
        layer.router = router
        layer.experts = experts


def knockout(layer: MoELayer, expert: int) -> AbstractContextManager[MoELayer]:
    """Knock one expert out for every token: no token is routed to it.

    Same as :func:`intervene` with ``forbid=[expert]``: its traffic goes to the next most
    probable experts. (``scales={expert: 0.0}`` instead silences it without rerouting.)
    """
    return intervene(layer, forbid=[expert])
