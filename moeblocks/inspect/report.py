"""A model-agnostic routing report: one record, its tables and ``inspect.md`` with plots.

Legend: L MoE layers, E experts, C word classes, T tokens, V vocabulary.

Any model that yields ``Routing`` records gets the same report: the caller (an SRA run in
:mod:`moeblocks.sra.inspection`, a Hugging Face checkpoint in :mod:`moeblocks.hf.report`)
collects a :class:`~moeblocks.inspect.collect.RoutingSet`, builds the per-layer
:class:`LayerTables` (:func:`layer_tables`), the probes (:func:`run_probes`) and whatever
else applies to its model into an :class:`Inspection`; :func:`format_inspection` prints it
and :func:`write_inspect_report` writes ``inspect.md`` with its plots
(``inspect-*.png``, and ``training-*.png`` from training log records,
:func:`write_training_figures`). Nothing here knows a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from moeblocks.inspect.anchors import AnchorTrace, format_trace
from moeblocks.inspect.collect import ForwardFn, RoutingSet
from moeblocks.inspect.metrics import (
    Coherence,
    LayerSummary,
    expert_token_counts,
    subtoken_coherence,
    summarise_layer,
    top_tokens,
    vocabulary_entropy,
)
from moeblocks.inspect.probe import (
    BUILTIN_PROBES,
    ConditionTest,
    OverlapTest,
    ProbeItem,
    run_condition_probe,
    run_overlap_probe,
)
from moeblocks.runtime.durable import atomic_write_text

__all__ = [
    "Inspection",
    "LayerTables",
    "ProbeResults",
    "WordClasses",
    "format_inspection",
    "layer_tables",
    "run_probes",
    "token_classes",
    "word_ids_from_pieces",
    "write_inspect_report",
    "write_training_figures",
]

_MARKERS = "ĠĊĉ"  # byte-level BPE's printable stand-ins for space, newline and tab


def word_ids_from_pieces(pieces: Sequence[str]) -> Int[Tensor, " T"]:
    """Word index of every byte-level BPE piece, or -1 for pieces outside words.

    A piece continues the current word when it starts with a letter or digit, carries no
    leading space/newline marker (``Ġ``, ``Ċ``, ``ĉ``) and follows a piece that ended
    inside a word; any other piece starting with a letter or digit opens a new word;
    punctuation and whitespace pieces get -1.
    """
    out, word, prev_wordy = [], -1, False
    for p in pieces:
        core = p.lstrip(_MARKERS)
        wordy = bool(core) and core[0].isalnum()
        if wordy and not (prev_wordy and p == core):
            word += 1
        out.append(word if wordy else -1)
        prev_wordy = wordy and core[-1].isalnum()
    return torch.tensor(out, dtype=torch.long)


def _as_piece(text: str) -> str:
    """Decoded token text in byte-level BPE form (leading space as ``Ġ``...)."""
    return text.replace(" ", "Ġ").replace("\n", "Ċ").replace("\t", "ĉ")


def token_classes(
    pieces: Sequence[str], word_ids: Tensor, word_classes: dict[str, str]
) -> tuple[Tensor, list[str]]:
    """Class of each token: the class of the whole word it belongs to (-1 if unknown).

    Args:
        pieces: Byte-level BPE pieces of the tokens.
        word_ids: Word index of each piece (:func:`word_ids_from_pieces`).
        word_classes: Class name of every labelled word.

    Returns:
        The class index of every token and the sorted class names.
    """
    classes = sorted(set(word_classes.values()))
    words: dict[int, str] = {}
    for p, w in zip(pieces, word_ids.tolist(), strict=True):
        if w >= 0:
            words[w] = words.get(w, "") + p.lstrip(_MARKERS)
    out = []
    for p, w in zip(pieces, word_ids.tolist(), strict=True):
        name = words[w] if w >= 0 else p.strip(_MARKERS + " ")
        out.append(classes.index(word_classes[name]) if name in word_classes else -1)
    return torch.tensor(out, dtype=torch.long), classes


@dataclass(frozen=True)
class LayerTables:
    """The per-layer tables of a report (one entry per MoE layer in each list).

    Attributes:
        summaries: Utilisation, dead experts, saturation, entropies.
        coherence: Word-level subtoken coherence.
        vocab_entropy: Mean vocabulary entropy of the experts that received tokens, nats.
        top_tokens: Per expert: its most frequent tokens as ``(text, count)``.
    """

    summaries: list[LayerSummary]
    coherence: list[Coherence]
    vocab_entropy: list[float]
    top_tokens: list[list[list[tuple[str, int]]]]


@dataclass(frozen=True)
class ProbeResults:
    """The overlap probe and the condition contrast, per layer (empty when not run).

    Attributes:
        probe_name: Which probe set ran (empty if none fitted the tokeniser).
        probe: Per layer: the overlap permutation test.
        contrast_name: Which condition contrast ran, e.g. ``"english-senses"`` (empty if
            none: a probe set without exactly two conditions, or a tokeniser that merges
            a target with its neighbours).
        contrast: Per layer: the condition permutation test.
    """

    probe_name: str = ""
    probe: tuple[OverlapTest, ...] = ()
    contrast_name: str = ""
    contrast: tuple[ConditionTest, ...] = ()


@dataclass(frozen=True)
class WordClasses:
    """Experts against labelled word classes (corpora that label their words).

    Attributes:
        classes: Class names C.
        purity: Per layer: overall expert purity over the classes.
        npmi: Per layer: NPMI of experts × classes, ``[E, C]``.
    """

    classes: list[str]
    purity: list[float]
    npmi: list[Tensor]


@dataclass(frozen=True)
class Inspection:
    """Everything a routing report shows about one model; what does not apply stays empty.

    Attributes:
        source: The run or checkpoint folder inspected.
        title: One line describing model and data.
        num_tokens: Evaluation tokens the metrics were computed on.
        tables: The per-layer tables.
        sentence: Pieces of the traced sentence, each decoded to its text.
        trace: Token-by-token routing trace of the sentence.
        probes: Overlap probe and condition contrast.
        k_sweep: ``(k, perplexity)`` pairs; the model's own k is ``k_train``.
        k_train: k the model was trained with (or runs with).
        sweep_tokens: Predicted tokens each k-sweep perplexity is over (0: unknown).
        split_tokens: Predicted tokens of the whole validation split, which ``eval``
            reads unless given ``--max-tokens`` (0: not known).
        word_classes: Experts × word classes, where the corpus labels its words.
        anchor_sims: Per cosine-routed layer: anchor similarity matrix ``[E, E]``.
        mean_probs: Per layer: mean router probability ``P_e`` of every expert.
        corridor: ``(floor, ceiling)`` of a bandpass loss on ``P_e``, else None.
        training: Training log records to draw ``training-*`` plots from.
        k_switch: Step at which k rose during training (None: k never changed).
        notes: Lines on what does not apply to this model and why, shown first.
    """

    source: Path
    title: str
    num_tokens: int
    tables: LayerTables
    sentence: list[str]
    trace: AnchorTrace
    probes: ProbeResults = ProbeResults()
    k_sweep: tuple[tuple[int, float], ...] = ()
    k_train: int = 0
    sweep_tokens: int = 0
    split_tokens: int = 0
    word_classes: WordClasses | None = None
    anchor_sims: tuple[Tensor, ...] = ()
    mean_probs: tuple[Tensor, ...] = ()
    corridor: tuple[float, float] | None = None
    training: tuple[Mapping[str, Any], ...] = ()
    k_switch: int | None = None
    notes: tuple[str, ...] = ()


@torch.no_grad()
def layer_tables(
    rs: RoutingSet,
    word_ids: Int[Tensor, " T"],
    vocab_size: int,
    show: Callable[[int], str],
) -> LayerTables:
    """The per-layer tables of a report, for any model's routing set.

    Returns, per layer of ``rs``: its summary, subtoken coherence, mean vocabulary
    entropy over the experts that received tokens, and each expert's five most frequent
    tokens (shown with ``show``).
    """
    summaries, coherence, vent, tops = [], [], [], []
    for r in rs.layers:
        summaries.append(summarise_layer(r))
        coherence.append(subtoken_coherence(r, word_ids))
        counts_EV = expert_token_counts(r, rs.token_ids, vocab_size, top1=False)
        h_E = vocabulary_entropy(counts_EV)
        live = ~torch.isnan(h_E)
        vent.append(h_E[live].mean().item() if live.any() else math.nan)
        tops.append([[(show(i), c) for i, c in row] for row in top_tokens(counts_EV, 5)])
    return LayerTables(summaries, coherence, vent, tops)


def _unless_merged(run: Callable[[], list]) -> tuple:
    try:
        return tuple(run())
    except ValueError:  # the tokeniser merges a target with its neighbours
        return ()


def run_probes(
    forward: ForwardFn,
    encode: Callable[[str], Sequence[int]],
    probes: Sequence[ProbeItem] | None,
    overlap_set: str,
    contrast_set: str,
    num_permutations: int = 1000,
) -> ProbeResults:
    """Run the overlap probe and the two-condition contrast through a model.

    Args:
        forward: The model as a function of token ids (see :mod:`moeblocks.inspect.collect`).
        encode: Text to token ids.
        probes: Custom probe items for both (None: the built-in sets named next).
        overlap_set: Built-in overlap set, e.g. ``"english"``.
        contrast_set: Built-in contrast set, listing first the condition expected to
            overlap more, e.g. ``"english-senses"``.
        num_permutations: Permutations of each test.

    Returns:
        The tests that ran; a set whose targets the tokeniser merges with their
        neighbours, or a contrast without exactly two conditions, is left empty.
    """
    overlap_items = BUILTIN_PROBES[overlap_set] if probes is None else probes
    contrast_items = BUILTIN_PROBES[contrast_set] if probes is None else probes
    probe = _unless_merged(
        lambda: run_overlap_probe(forward, encode, overlap_items, num_permutations)
    )
    labels = list(dict.fromkeys(it.condition for it in contrast_items if it.condition))
    contrast: tuple = ()
    if len(labels) == 2:
        contrast = _unless_merged(
            lambda: run_condition_probe(
                forward, encode, contrast_items, *labels, num_permutations=num_permutations
            )
        )
    custom = probes is not None
    return ProbeResults(
        ("custom" if custom else overlap_set) if probe else "",
        probe,
        ("custom" if custom else contrast_set) if contrast else "",
        contrast,
    )


def _layer_table(ins: Inspection) -> list[str]:
    lines = [
        "layer  dead      mean-k  saturation  entropy/logE  usage-H/logE  vocab-H  "
        "coherence top1 (shuffled)  jaccard (shuffled)" + ("  purity" if ins.word_classes else ""),
    ]
    for i, s in enumerate(ins.tables.summaries):
        c = ins.tables.coherence[i]
        E = len(s.utilisation)
        row = (
            f"{i:5d}  {len(s.dead):3d}/{E:<4d} {s.mean_k:6.2f}  {s.saturation:10.3f}  "
            f"{s.entropy / s.max_entropy:12.3f}  {s.usage_entropy / s.max_entropy:12.3f}  "
            f"{ins.tables.vocab_entropy[i]:7.2f}  "
            f"{c.top1_agreement:14.3f} ({c.baseline_top1:.3f})  "
            f"{c.jaccard:7.3f} ({c.baseline_jaccard:.3f})"
        )
        if ins.word_classes:
            row += f"  {ins.word_classes.purity[i]:6.3f}"
        lines.append(row)
    return lines


def _sweep_budget(sweep_tokens: int, split_tokens: int) -> str:
    """What the k-sweep's perplexities are over, and how ``eval`` gets the same numbers."""
    if not sweep_tokens:
        return ""
    if split_tokens and sweep_tokens < split_tokens:
        # eval reads the whole split by default: a different text, a different perplexity.
        return (
            f" (perplexity over the first {sweep_tokens} of {split_tokens} validation tokens;"
            f" eval reads all {split_tokens}, eval --max-tokens {sweep_tokens} these)"
        )
    if split_tokens:
        return f" (perplexity over all {split_tokens} validation tokens, as eval)"
    return f" (perplexity over {sweep_tokens} tokens)"


def format_inspection(ins: Inspection, experts_shown: int = 6) -> str:
    """Plain-text tables of an :class:`Inspection`, its notes first."""
    notes = [*ins.notes, ""] if ins.notes else []
    return "\n".join([*notes, _tables_text(ins, experts_shown)])


def _tables_text(ins: Inspection, experts_shown: int = 6) -> str:
    lines = [f"{ins.source}: {ins.title}", f"routing collected over {ins.num_tokens} tokens", ""]
    lines += _layer_table(ins)
    lines.append(
        "(saturation: mean top-1 probability; entropies normalised by log E; vocab-H: "
        "mean per-expert token entropy, nats; coherence over adjacent pieces of one word)"
    )
    if ins.probes.probe:
        lines += [
            "",
            f"overlap probe ({ins.probes.probe_name}, {ins.probes.probe[0].num_items} items):",
        ]
        for i, p in enumerate(ins.probes.probe):
            lines.append(
                f"  layer {i}: same-word Jaccard {p.observed:.3f} vs re-paired "
                f"{p.null_mean:.3f}, permutation p = {p.p_value:.4f}"
            )
    if ins.probes.contrast:
        c0 = ins.probes.contrast[0]
        lines += [
            "",
            f"condition contrast ({ins.probes.contrast_name}, {c0.num_first} {c0.first!r} vs "
            f"{c0.num_second} {c0.second!r} pairs):",
        ]
        for i, c in enumerate(ins.probes.contrast):
            lines.append(
                f"  layer {i}: Jaccard {c.first} {c.mean_first:.3f} vs {c.second} "
                f"{c.mean_second:.3f}, permutation p = {c.p_value:.4f}"
            )
    if ins.k_sweep:
        over = _sweep_budget(ins.sweep_tokens, ins.split_tokens)
        lines += ["", f"k-sweep{over}:  " + "  ".join(f"k={k}: {p:.2f}" for k, p in ins.k_sweep)]
    lines += ["", "busiest experts and their top tokens:"]
    for i, s in enumerate(ins.tables.summaries):
        for e in s.utilisation.argsort(descending=True)[:experts_shown].tolist():
            toks = "  ".join(f"{t!r}×{c}" for t, c in ins.tables.top_tokens[i][e])
            lines.append(f"  L{i} e{e:<3d} {100 * float(s.utilisation[e]):5.1f}%  {toks}")
    lines += ["", "sentence trace (expert:weight per layer, nearest anchors by cosine):"]
    lines.append(format_trace(ins.trace, ins.sentence))
    return "\n".join(lines)


def write_training_figures(
    records: Sequence[Mapping[str, Any]],
    out: Path,
    fmt: str = "png",
    num_experts: int | None = None,
    k_switch: int | None = None,
) -> list[tuple[str, str]]:
    """Draw the ``training-*`` plots of a run's ``log.jsonl`` records into ``out``.

    Curves (CE, aux loss, LR, k) always; the utilisation heat-map, dead experts and
    router entropy where the records carry ``expert_counts`` / ``router_entropy``.

    Returns:
        ``(title, file name)`` of every plot written, for a report to embed.
    """
    from moeblocks.inspect import plots

    if not records:
        return []
    out = Path(out)
    made = [("Training curves", f"training-curves.{fmt}")]
    plots.plot_training_curves(records, out / made[0][1], k_switch=k_switch)
    if any(r.get("expert_counts") for r in records):
        made.append(("Expert utilisation over training", f"training-utilisation.{fmt}"))
        plots.plot_utilisation_history(records, out / made[-1][1])
    if any(r.get("expert_counts") or isinstance(r.get("dead"), list) for r in records):
        made.append(("Dead experts over training", f"training-dead.{fmt}"))
        plots.plot_dead_history(records, out / made[-1][1])
    if any(r.get("router_entropy") for r in records):
        made.append(("Router entropy over training", f"training-entropy.{fmt}"))
        plots.plot_entropy_history(records, out / made[-1][1], num_experts)
    return made


def write_inspect_report(ins: Inspection, out: Path, fmt: str = "png") -> Path:
    """Write ``inspect.md`` and its plots into the folder ``out``; return the report path.

    Args:
        ins: The inspection.
        out: The report folder (``moeblocks inspect`` uses ``RUN/reports``).
        fmt: Plot format: ``png`` (150 dpi), ``svg`` or ``pdf``.
    """
    from moeblocks.inspect import plots

    if fmt not in plots.FORMATS:
        raise ValueError(f"fmt must be one of {plots.FORMATS}, got {fmt!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def figure(title: str, name: str) -> list[str]:
        return [f"## {title}", "", f"![{title.lower()}]({name})", ""]

    parts = [f"# Routing inspection: `{ins.source}`", "", ins.title, ""]
    if ins.notes:
        parts += [*(f"- {line}" for line in ins.notes), ""]
    parts += [f"Routing collected over {ins.num_tokens} validation tokens.", ""]
    parts += ["```", *_layer_table(ins), "```", ""]
    util = torch.stack([s.utilisation for s in ins.tables.summaries])
    probs = torch.stack(list(ins.mean_probs)) if ins.mean_probs else None
    name = f"inspect-utilisation.{fmt}"
    plots.plot_utilisation(util, out / name, probs, ins.corridor)
    parts += figure("Expert utilisation", name)
    if ins.anchor_sims:
        name = f"inspect-anchors.{fmt}"
        plots.plot_anchor_similarity(ins.anchor_sims, out / name)
        parts += figure("Anchor similarity", name)
    if ins.word_classes is not None and ins.word_classes.npmi:
        parts += ["## Experts × word classes (NPMI)", ""]
        for i, m in enumerate(ins.word_classes.npmi):
            name = f"inspect-classes-layer{i}.{fmt}"
            plots.plot_class_heatmap(m, ins.word_classes.classes, out / name, f"layer {i}: NPMI")
            parts += [f"![experts x classes, layer {i}]({name})"]
        parts += [""]
    if ins.k_sweep:
        ks, ppls = zip(*ins.k_sweep, strict=True)
        name = f"inspect-k-sweep.{fmt}"
        plots.plot_k_sweep(ks, ppls, ins.k_train, out / name, ins.sweep_tokens or None)
        parts += figure("Inference-time k-sweep", name)
    E = len(ins.tables.summaries[0].utilisation)
    name = f"inspect-routing-map.{fmt}"
    plots.plot_routing_map(
        torch.stack(list(ins.trace.experts)),
        torch.stack(list(ins.trace.weights)),
        ins.sentence,
        out / name,
        E,
        word_ids_from_pieces([_as_piece(p) for p in ins.sentence]),
    )
    parts += figure("One sentence, token by layer", name)
    for title, name in write_training_figures(ins.training, out, fmt, E, ins.k_switch):
        parts += figure(title, name)
    parts += ["## All tables", "", "```", _tables_text(ins), "```"]
    path = out / "inspect.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
