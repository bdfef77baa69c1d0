"""Expert overlap probe: do two contexts that share a target word send it to the same experts?

Legend: n probe items, K experts per token, E experts, L MoE layers.

A probe item is a target word and two different contexts that both contain it. For
every layer the probe takes the target's top-k expert set in each context (the set of
its last piece, which has seen the whole word) and measures the Jaccard overlap of the
two sets. A permutation test asks whether matched pairs overlap more than pairs of
*different* targets: the null distribution re-pairs context A of item i with context B
of item π(i) for random permutations π.

A *condition contrast* compares two kinds of pairs instead: items labelled, e.g.,
``"same-sense"`` against ``"different-sense"`` (one word in two senses), or a word
swapped for a ``"similar"`` against a ``"dissimilar"`` word (``target_b`` names the word
of context B). Its permutation test shuffles the condition labels
(:func:`condition_permutation_test`, :func:`run_condition_probe`).

Probe sets are JSONL files, one ``{"target": ..., "context_a": ..., "context_b": ...}``
per line, optionally with ``"target_b"`` and ``"condition"`` (:func:`load_probes`).
:data:`BUILTIN_PROBES` holds small sets written for this project: ``"synthetic"`` and
``"english"`` (matched pairs), ``"english-senses"`` (same vs different sense) and
``"synthetic-swap"`` (similar vs dissimilar word class).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from moeblocks.inspect.collect import ForwardFn
from moeblocks.inspect.metrics import topk_jaccard

__all__ = [
    "BUILTIN_PROBES",
    "ConditionTest",
    "OverlapTest",
    "ProbeItem",
    "condition_permutation_test",
    "load_probes",
    "locate_word",
    "overlap_permutation_test",
    "run_condition_probe",
    "run_overlap_probe",
]


@dataclass(frozen=True)
class ProbeItem:
    """A target word in context A and a word (the same one by default) in context B.

    Attributes:
        target: The word probed in ``context_a``.
        context_a: A text containing ``target``.
        context_b: A text containing ``target_b`` (or ``target``).
        target_b: The word probed in ``context_b`` when it differs (swap probes).
        condition: Label of the pair for condition contrasts, e.g. ``"same-sense"``.
    """

    target: str
    context_a: str
    context_b: str
    target_b: str | None = None
    condition: str = ""

    @property
    def word_b(self) -> str:
        """The word probed in ``context_b``."""
        return self.target if self.target_b is None else self.target_b


def _items(table: str) -> tuple[ProbeItem, ...]:
    rows = (line.split(" | ") for line in table.strip().splitlines())
    return tuple(ProbeItem(t.strip(), a.strip(), b.strip()) for t, a, b in rows)


def _contrast_items(table: str) -> tuple[ProbeItem, ...]:
    # condition | target | context A | target B | context B
    rows = ([c.strip() for c in line.split(" | ")] for line in table.strip().splitlines())
    return tuple(ProbeItem(t, a, b, tb, cond) for cond, t, a, tb, b in rows)


# One item per line: target | context A | context B.
BUILTIN_PROBES: dict[str, tuple[ProbeItem, ...]] = {
    "synthetic": _items(
        """
cat | yesterday , the red cat chased a dog . | now , a fox sees the cat .
dog | today , a dog likes the goat . | yesterday , the owl found a black dog .
fox | now , the fox meets a cow . | yesterday , a blue fox fed the duck .
horse | today , a white horse helps the frog . | now , the bear calls a horse .
red | now , a red bird watches the cat . | yesterday , the red wolf met a owl .
blue | today , the blue mouse finds a lion . | now , a goat sees the blue cow .
green | yesterday , a green frog saw the dog . | today , the green owl likes a cat .
three | now , the cat chases a dog three times . | today , a fox sees the owl three times .
seven | yesterday , a lion helped the cow seven times . | now , a bird feeds a goat seven times .
chased | yesterday , the fox chased a cat . | yesterday , a grey dog chased the duck .
sees | today , a cow sees the horse . | now , the pink tiger sees a wolf .
found | yesterday , the duck found a mouse . | yesterday , a bear found the red fox .
near | now , a cat likes the dog near a cow . | yesterday , the owl saw a fox near the goat .
with | today , the lion meets a bird with a frog . | now , a sheep helps the cat with the dog .
tiger | now , a tiger watches the sheep . | yesterday , the silver tiger called a mouse .
watched | yesterday , the cow watched a bird . | yesterday , a pink owl watched the wolf .
"""
    ),
    "english": _items(
        """
bank | She sat on the river bank and watched boats. | He opened an account at the bank.
list | The function returns a list of strings. | Append the item to the end of the list.
class | Define a class with two methods. | The class attribute is shared by all instances.
file | Open the file in binary mode. | The file was closed before the error occurred.
loop | The loop stops when the counter reaches ten. | Use a for loop to iterate over the keys.
value | The default value is None. | Each key maps to exactly one value.
error | An error is raised if the name is missing. | The parser reports the first syntax error.
string | Convert the number to a string first. | A raw string keeps its backslashes.
module | Import the module before calling it. | Every module has its own namespace.
light | Turn on the light in the kitchen. | The morning light came through the window.
water | She drank a glass of water. | The water in the lake was cold.
music | They listened to music all evening. | His music was played on the radio.
"""
    ),
    "english-senses": _contrast_items(
        """
same-sense | bank | She sat on the river bank. | bank | The boat drifted to the muddy bank.
different-sense | bank | She sat on the river bank. | bank | He opened an account at the bank.
same-sense | light | Turn on the light in the hall. | light | The lamp gave a warm light.
different-sense | light | Turn on the light in the hall. | light | The box was light to carry.
same-sense | key | He lost the key to the door. | key | The key turned in the old lock.
different-sense | key | He lost the key to the door. | key | Each key in the dict maps to a value.
same-sense | string | Convert the number to a string. | string | A raw string keeps its backslashes.
different-sense | string | Convert the number to a string. | string | She tied it up with string.
same-sense | table | They ate dinner at the table. | table | He put the cups on the kitchen table.
different-sense | table | They ate dinner at the table. | table | The table lists every opcode.
same-sense | class | The class attribute is shared. | class | Define a class with two methods.
different-sense | class | The class attribute is shared. | class | The class went on a school trip.
same-sense | return | The function will return None. | return | A generator may return a value.
different-sense | return | The function will return None. | return | They return home next week.
same-sense | spring | The flowers bloom in spring. | spring | The spring rain filled the garden.
different-sense | spring | The flowers bloom in spring. | spring | The spring in the clock broke.
"""
    ),
    "synthetic-swap": _contrast_items(
        """
similar | cat | yesterday , the cat chased a dog . | fox | yesterday , the fox chased a dog .
dissimilar | cat | yesterday , the cat chased a dog . | seven | yesterday , the seven chased a dog .
similar | red | now , a red bird sees the cat . | blue | now , a blue bird sees the cat .
dissimilar | red | now , a red bird sees the cat . | chased | now , a chased bird sees the cat .
similar | chased | yesterday , the fox chased a cat . | found | yesterday , the fox found a cat .
dissimilar | chased | yesterday , the fox chased a cat . | green | yesterday , the fox green a cat .
similar | three | now , a cat sees a dog three times . | five | now , a cat sees a dog five times .
dissimilar | three | now , a cat sees a dog three times . | owl | now , a cat sees a dog owl times .
similar | sees | today , a cow sees the horse . | likes | today , a cow likes the horse .
dissimilar | sees | today , a cow sees the horse . | near | today , a cow near the horse .
similar | tiger | now , a tiger sees the sheep . | wolf | now , a wolf sees the sheep .
dissimilar | tiger | now , a tiger sees the sheep . | helped | now , a helped sees the sheep .
"""
    ),
}
"""Small built-in probe sets, keyed by the corpus they suit."""


def load_probes(path: str | Path) -> tuple[ProbeItem, ...]:
    """Read a JSONL probe set: one ``{"target", "context_a", "context_b"}`` object per line.

    Optional keys: ``"target_b"`` (the word of context B, for swap probes) and
    ``"condition"`` (a label for :func:`run_condition_probe`).

    Raises:
        ValueError: On a line that is not such an object, or whose contexts lack the
            target word; the message names the file and line.
    """
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            target_b = row.get("target_b")
            item = ProbeItem(
                str(row["target"]),
                str(row["context_a"]),
                str(row["context_b"]),
                None if target_b is None else str(target_b),
                str(row.get("condition", "")),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{n}: expected an object with target, context_a, context_b ({err})"
            ) from err
        for ctx, word in ((item.context_a, item.target), (item.context_b, item.word_b)):
            if _find(ctx, word) is None:
                raise ValueError(f"{path}:{n}: context {ctx!r} lacks target {word!r}")
        items.append(item)
    return tuple(items)


def _find(text: str, word: str) -> int | None:
    m = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text)
    return None if m is None else m.start()


def locate_word(
    encode: Callable[[str], Sequence[int]], text: str, word: str
) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the positions of the pieces of the first ``word`` in it.

    Works for tokenisers that do not merge across the word's start (byte-level BPE,
    whitespace tokenisers): the pieces are the ids between ``encode(prefix)`` (its
    trailing spaces removed, since BPE attaches a space to the next word) and
    ``encode(prefix + word)``.

    Raises:
        ValueError: When ``word`` does not occur as a whole word in ``text``, or the
            tokeniser merges it with its neighbours.
    """
    start = _find(text, word)
    if start is None:
        raise ValueError(f"word {word!r} does not occur in text {text!r}")
    # The space before the word belongs to its first piece in byte-level BPE ("Ġcat").
    before = list(encode(text[:start].rstrip(" ")))
    upto = list(encode(text[: start + len(word)]))
    ids = list(encode(text))
    if upto[: len(before)] != before or ids[: len(upto)] != upto or len(upto) == len(before):
        raise ValueError(f"the tokeniser merges {word!r} with its neighbours in {text!r}")
    return ids, list(range(len(before), len(upto)))


@dataclass(frozen=True)
class OverlapTest:
    """Result of the overlap permutation test at one layer.

    Attributes:
        observed: Mean Jaccard overlap of matched pairs (same target), in [0, 1].
        null_mean: Mean overlap of re-paired (different-target) pairs over permutations.
        p_value: One-sided permutation p-value of ``observed`` exceeding the null,
            ``(1 + #{null ≥ observed}) / (1 + permutations)``.
        num_items: n, the probe items.
    """

    observed: float
    null_mean: float
    p_value: float
    num_items: int


def overlap_permutation_test(
    sets_a: Int[Tensor, "n K"],
    sets_b: Int[Tensor, "m K2"],
    num_experts: int,
    num_permutations: int = 2000,
    seed: int = 0,
) -> OverlapTest:
    """Permutation test of whether matched expert sets overlap more than random pairs.

    The statistic is ``mean_i J(A_i, B_i)`` (Jaccard of top-k sets); the null re-pairs
    ``A_i`` with ``B_π(i)`` for uniform random permutations π.

    Args:
        sets_a: Top-k experts of the target in context A, one row per item.
        sets_b: Top-k experts of the target in context B.
        num_experts: E.
        num_permutations: Random permutations of the null distribution.
        seed: Seed of the permutations.
    """
    n = sets_a.shape[0]
    if sets_b.shape[0] != n or n < 2:
        raise ValueError(
            f"sets_a and sets_b need the same number of rows (>= 2), got {n}, {sets_b.shape[0]}"
        )
    ia = torch.arange(n).repeat_interleave(n)
    ib = torch.arange(n).repeat(n)
    jac_nn = topk_jaccard(sets_a[ia], sets_b[ib], num_experts).view(n, n)
    observed = jac_nn.diagonal().mean().item()
    g = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(n, generator=g) for _ in range(num_permutations)])
    null = jac_nn[torch.arange(n).expand_as(perms), perms].mean(-1)
    p = (1 + int((null >= observed - 1e-12).sum())) / (1 + num_permutations)
    return OverlapTest(observed, null.mean().item(), p, n)


@dataclass(frozen=True)
class ConditionTest:
    """Result of the condition contrast at one layer.

    Attributes:
        first: Label of the condition expected to overlap more, e.g. ``"same-sense"``.
        second: Label of the other condition.
        mean_first: Mean Jaccard overlap of the ``first`` pairs, in [0, 1].
        mean_second: Mean Jaccard overlap of the ``second`` pairs, in [0, 1].
        p_value: One-sided permutation p-value of ``mean_first − mean_second`` under
            shuffled labels, ``(1 + #{null ≥ observed}) / (1 + permutations)``.
        num_first: Pairs in ``first``.
        num_second: Pairs in ``second``.
    """

    first: str
    second: str
    mean_first: float
    mean_second: float
    p_value: float
    num_first: int
    num_second: int


def condition_permutation_test(
    overlaps: Float[Tensor, " n"],
    conditions: Sequence[str],
    first: str,
    second: str,
    num_permutations: int = 2000,
    seed: int = 0,
) -> ConditionTest:
    """Permutation test of whether ``first`` pairs overlap more than ``second`` pairs.

    The statistic is the difference of the two conditions' mean overlaps; the null
    shuffles the labels among the pairs of both conditions (pairs of other conditions
    are left out).

    Args:
        overlaps: Jaccard overlap of each pair.
        conditions: Condition label of each pair.
        first: The condition expected to overlap more.
        second: The condition to compare against.
        num_permutations: Random label shuffles of the null distribution.
        seed: Seed of the shuffles.

    Raises:
        ValueError: When the lengths differ or a condition has no pair.
    """
    if len(conditions) != overlaps.shape[0]:
        raise ValueError(
            f"conditions has {len(conditions)} labels for {overlaps.shape[0]} overlaps"
        )
    keep = [i for i, c in enumerate(conditions) if c in (first, second)]
    is_first = torch.tensor([conditions[i] == first for i in keep])
    values = overlaps[keep].double()
    n_first, n_second = int(is_first.sum()), int((~is_first).sum())
    if n_first == 0 or n_second == 0:
        raise ValueError(
            f"need pairs of both conditions, got {n_first} {first!r} and {n_second} {second!r}"
        )

    def diff(mask: Tensor) -> Tensor:  # mask [..., n] -> difference of means [...]
        m = mask.double()
        return (values * m).sum(-1) / n_first - (values * (1 - m)).sum(-1) / n_second

    observed = diff(is_first).item()
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.stack(
        [is_first[torch.randperm(len(keep), generator=g)] for _ in range(num_permutations)]
    )
    null = diff(shuffled)
    p = (1 + int((null >= observed - 1e-12).sum())) / (1 + num_permutations)
    mean_first = values[is_first].mean().item()
    mean_second = values[~is_first].mean().item()
    return ConditionTest(first, second, mean_first, mean_second, p, n_first, n_second)


@torch.no_grad()
def _target_sets(
    forward: ForwardFn, encode: Callable[[str], Sequence[int]], items: Sequence[ProbeItem]
) -> list[tuple[Tensor, Tensor]]:
    """Per layer: the top-k experts of each item's word in context A and in context B."""
    sets: list[list[list[Tensor]]] = []  # [side][layer][item] -> K experts
    for side in ("a", "b"):
        per_layer: list[list[Tensor]] = []
        for item in items:
            text, word = (
                (item.context_a, item.target) if side == "a" else (item.context_b, item.word_b)
            )
            ids, pos = locate_word(encode, text, word)
            routings = forward(torch.tensor([ids], dtype=torch.long))
            if not per_layer:
                per_layer = [[] for _ in routings]
            for store, r in zip(per_layer, routings, strict=True):
                store.append(r.experts[pos[-1]].cpu())
        sets.append(per_layer)
    return [(torch.stack(a), torch.stack(b)) for a, b in zip(sets[0], sets[1], strict=True)]


def run_overlap_probe(
    forward: ForwardFn,
    encode: Callable[[str], Sequence[int]],
    items: Sequence[ProbeItem],
    num_permutations: int = 2000,
    seed: int = 0,
) -> list[OverlapTest]:
    """Run the probe through a model: one :class:`OverlapTest` per MoE layer.

    Args:
        forward: ``ids_BS -> routings`` (e.g. :func:`~moeblocks.inspect.sra_forward`).
        encode: Text to token ids (the model's tokeniser).
        items: Probe items (at least 2).
        num_permutations: Permutations of the null.
        seed: Seed of the permutations.
    """
    out = []
    for a, b in _target_sets(forward, encode, items):
        E = int(max(a.max(), b.max())) + 1
        out.append(overlap_permutation_test(a, b, E, num_permutations, seed))
    return out


def run_condition_probe(
    forward: ForwardFn,
    encode: Callable[[str], Sequence[int]],
    items: Sequence[ProbeItem],
    first: str,
    second: str,
    num_permutations: int = 2000,
    seed: int = 0,
) -> list[ConditionTest]:
    """Run a condition contrast through a model: one :class:`ConditionTest` per MoE layer.

    Example: ``run_condition_probe(fwd, enc, BUILTIN_PROBES["english-senses"],
    "same-sense", "different-sense")``.

    Args:
        forward: ``ids_BS -> routings`` (e.g. :func:`~moeblocks.inspect.sra_forward`).
        encode: Text to token ids (the model's tokeniser).
        items: Labelled probe items, both conditions present.
        first: The condition expected to overlap more.
        second: The condition to compare against.
        num_permutations: Label shuffles of the null.
        seed: Seed of the shuffles.
    """
    conditions = [item.condition for item in items]
    out = []
    for a, b in _target_sets(forward, encode, items):
        E = int(max(a.max(), b.max())) + 1
        overlaps = topk_jaccard(a, b, E)
        out.append(
            condition_permutation_test(overlaps, conditions, first, second, num_permutations, seed)
        )
    return out
