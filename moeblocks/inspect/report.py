"""``moeblocks inspect``: routing inspection of a trained SRA run, as tables and a report.

Legend: L MoE layers, E experts, C word classes, T tokens, V vocabulary.

:func:`inspect_run` loads a run folder, collects the routing records of every MoE layer
over (the start of) its validation split and computes the metrics of
:mod:`moeblocks.inspect`; :func:`format_inspection` prints them and
:func:`write_inspect_report` writes ``inspect.md`` with its plots into the run's report
folder ``RUN/reports/`` (see :mod:`moeblocks.sra.evaluate` for the whole layout):
``inspect-*.png`` of the routing and ``training-*.png`` drawn from ``log.jsonl``
(:func:`write_training_figures`). The SRA modules are imported inside these functions:
the metrics and plots themselves know no model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from moeblocks.inspect.anchors import (
    AnchorTrace,
    anchor_similarity,
    anchor_traces,
    format_trace,
    layer_temperatures,
)
from moeblocks.inspect.collect import RoutingSet, collect_routing, sra_forward
from moeblocks.inspect.metrics import (
    Coherence,
    LayerSummary,
    class_counts,
    expert_token_counts,
    npmi,
    purity,
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
from moeblocks.routers import CosineScorer

__all__ = [
    "RunInspection",
    "format_inspection",
    "inspect_run",
    "layer_tables",
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


def _token_classes(
    pieces: Sequence[str], word_ids: Tensor, word_classes: dict[str, str]
) -> tuple[Tensor, list[str]]:
    """Class of each token: the class of the whole word it belongs to (-1 if unknown)."""
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
class RunInspection:
    """Everything ``moeblocks inspect`` reports about a run.

    Attributes:
        run: The run folder.
        title: One line describing model and data.
        num_tokens: Evaluation tokens the metrics were computed on.
        summaries: Per layer: utilisation, dead experts, saturation, entropies.
        coherence: Per layer: word-level subtoken coherence.
        vocab_entropy: Per layer: mean vocabulary entropy of the live experts, nats.
        top_tokens: Per layer and expert: its most frequent tokens as ``(text, count)``.
        classes: Word-class names where the corpus has known classes, else empty.
        purity: Per layer: overall expert purity over classes (empty without classes).
        npmi: Per layer: NPMI of experts × classes (empty without classes).
        probe_name: Which probe set ran (empty if none fitted the tokeniser).
        probe: Per layer: the overlap permutation test.
        contrast_name: Which condition contrast ran, e.g. ``"english-senses"`` (empty if
            none: a custom probe set without exactly two conditions, or a tokeniser
            that merges a target with its neighbours).
        contrast: Per layer: the condition permutation test.
        k_sweep: ``(k, perplexity)`` pairs; the training k is ``k_train``.
        k_train: k at the end of training.
        anchor_sims: Per cosine-routed layer: anchor similarity matrix.
        sentence: Pieces of the traced sentence, each decoded to its text.
        trace: Anchor–token trace of the sentence.
        mean_probs: Per layer: mean router probability ``P_e`` of every expert.
        corridor: ``(floor, ceiling)`` of the run's bandpass loss on ``P_e``, else None.
        sweep_tokens: Predicted tokens each k-sweep perplexity is over.
        split_tokens: Predicted tokens of the whole validation split, which ``eval``
            reads unless given ``--max-tokens`` (0: not known).
        training: The run's ``log.jsonl`` records (empty when there is no log).
        k_switch: Step at which k rose during training (None: k never changed).
    """

    run: Path
    title: str
    num_tokens: int
    summaries: list[LayerSummary]
    coherence: list[Coherence]
    vocab_entropy: list[float]
    top_tokens: list[list[list[tuple[str, int]]]]
    classes: list[str]
    purity: list[float]
    npmi: list[Tensor]
    probe_name: str
    probe: list[OverlapTest]
    contrast_name: str
    contrast: list[ConditionTest]
    k_sweep: list[tuple[int, float]]
    k_train: int
    anchor_sims: list[Tensor]
    sentence: list[str]
    trace: AnchorTrace
    mean_probs: tuple[Tensor, ...] = ()
    corridor: tuple[float, float] | None = None
    sweep_tokens: int = 0
    split_tokens: int = 0
    training: tuple[Mapping[str, Any], ...] = ()
    k_switch: int | None = None


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


def _contrast(forward: Any, encode: Any, items: Sequence[ProbeItem]) -> list[ConditionTest]:
    labels = list(dict.fromkeys(it.condition for it in items if it.condition))
    if len(labels) != 2:
        return []
    try:
        return run_condition_probe(forward, encode, items, *labels, num_permutations=1000)
    except ValueError:  # the tokeniser merges a target with its neighbours
        return []


def _probe(forward: Any, encode: Any, items: Sequence[ProbeItem]) -> list[OverlapTest]:
    try:
        return run_overlap_probe(forward, encode, items, num_permutations=1000)
    except ValueError:  # the tokeniser merges a target with its neighbours
        return []


@torch.no_grad()
def layer_tables(
    rs: RoutingSet,
    word_ids: Int[Tensor, " T"],
    vocab_size: int,
    show: Callable[[int], str],
) -> tuple[list[LayerSummary], list[Coherence], list[float], list[list[list[tuple[str, int]]]]]:
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
    return summaries, coherence, vent, tops


def inspect_run(
    run: Path,
    text: str | None = None,
    max_tokens: int = 8192,
    device: str = "cpu",
    k_sweep: bool = True,
    probes: Sequence[ProbeItem] | None = None,
    data: str | None = None,
    progress: bool = False,
) -> RunInspection:
    """Collect routing over a run's validation split and compute every metric.

    Args:
        run: Run folder (or checkpoint folder) written by ``moeblocks train``.
        text: Sentence to trace token by token (default: the first validation line).
        max_tokens: Validation tokens to collect routing on (and to evaluate the k-sweep).
        device: Where to run the model.
        k_sweep: Also evaluate perplexity at k = 1 … k_final + 2 (one pass per k).
        probes: Overlap-probe items (default: the built-in ``synthetic`` set for the
            synthetic corpus, else the ``english`` set).
        data: The run's data, when it lies outside the run folder (see
            :func:`moeblocks.sra.evaluate.load_run`).
        progress: A progress bar over the forward passes, on stderr.
    """
    from moeblocks.sra.data import WORD_CLASSES, eval_windows
    from moeblocks.sra.evaluate import (
        evaluate,
        load_run,
        num_batches,
        progress_bar,
        run_corpus,
        run_folder,
    )
    from moeblocks.sra.tokencache import encode_split
    from moeblocks.sra.tokenizer import encode
    from moeblocks.sra.train import run_summary

    model, tok, ckpt = load_run(Path(run), device, data)
    model.eval()
    cfg = ckpt.config
    if not model.moe_layers:
        from moeblocks.sra.config import UsageError

        raise UsageError(f"{run} is a dense model: there is no routing to inspect")
    corpus = run_corpus(ckpt)
    tokens = torch.from_numpy(encode_split(tok, corpus, "valid")).long()
    x_WS, _ = eval_windows(tokens, cfg.seq_len, max_tokens)
    forward = sra_forward(model)
    ks = range(1, min(cfg.k_final + 2, cfg.num_experts) + 1) if k_sweep else range(0)
    per_pass = num_batches(tokens, cfg.seq_len, cfg.batch_size, max_tokens)
    bar = progress_bar(per_pass * (1 + len(ks)) + 2, "inspect: routing", progress)
    rs = collect_routing(forward, _counted(x_WS.split(cfg.batch_size), bar))
    ids = rs.token_ids.tolist()
    piece_of = {i: tok.id_to_token(i) or "" for i in set(ids)}
    pieces = [piece_of[i] for i in ids]
    word_ids = word_ids_from_pieces(pieces)
    V = cfg.vocab_size

    summaries, coherence, vent, tops = layer_tables(rs, word_ids, V, lambda i: tok.decode([i]))
    pur, npm = [], []
    synthetic = ckpt.data == "synthetic"
    cls_T, class_names = _token_classes(pieces, word_ids, WORD_CLASSES) if synthetic else (None, [])
    if cls_T is not None:
        for r in rs.layers:
            c_EC = class_counts(r, cls_T, len(class_names))
            pur.append(purity(c_EC)[1])
            npm.append(npmi(c_EC))

    def enc(s: str) -> list[int]:
        return encode(tok, s).tolist()

    probe_name = "synthetic" if synthetic else "english"
    if probes is not None:
        probe_name = "custom"
    bar.set_description_str("inspect: probes")
    probe = _probe(forward, enc, BUILTIN_PROBES[probe_name] if probes is None else probes)
    bar.update()
    # Built-in contrasts list the condition expected to overlap more first.
    contrast_name = (
        ("synthetic-swap" if synthetic else "english-senses") if probes is None else "custom"
    )
    contrast = _contrast(forward, enc, BUILTIN_PROBES[contrast_name] if probes is None else probes)
    bar.update()
    sweep: list[tuple[int, float]] = []
    sweep_tokens = 0
    for k in ks:
        bar.set_description_str(f"inspect: k={k}")
        res = evaluate(model, tokens, cfg.batch_size, max_tokens, k, bar.update)
        sweep.append((k, res.ppl))
        sweep_tokens = res.tokens
    bar.close()
    sims = [
        anchor_similarity(m.router.scorer)
        for m in model.moe_layers
        if isinstance(m.router.scorer, CosineScorer)
    ]
    if text is None:
        text = next((ln for ln in corpus.valid.splitlines() if ln.strip()), "")
    sent_ids = enc(text)[: cfg.seq_len] or [0]
    sent_routings = forward(torch.tensor([sent_ids], dtype=torch.long))
    trace = anchor_traces(sent_routings, layer_temperatures(model))
    title = (
        f"{cfg.n_layers} layers, FFN `{cfg.ffn}`, {cfg.num_experts} experts, "
        f"k {cfg.k_start}->{cfg.k_final}, step {ckpt.step}, data `{ckpt.data}`"
    )
    corridor = (cfg.band_floor, cfg.band_ceiling) if cfg.balance == "bandpass" else None
    k_switch = cfg.k_switch_step if cfg.k_start != cfg.k_final else None
    return RunInspection(
        Path(run), title, rs.num_tokens, summaries, coherence, vent, tops, class_names, pur,
        npm, probe_name if probe else "", probe, contrast_name if contrast else "", contrast,
        sweep, cfg.k_final, sims,
        [tok.decode([i]) for i in sent_ids], trace,
        mean_probs=tuple(r.probs.mean(0) for r in rs.layers), corridor=corridor,
        sweep_tokens=sweep_tokens, split_tokens=eval_windows(tokens, cfg.seq_len)[1].numel(),
        training=tuple(run_summary(run_folder(Path(run)))["train"]),
        k_switch=k_switch,
    )  # fmt: skip


def _counted(batches: Iterable[Tensor], bar: Any) -> Iterator[Tensor]:
    for batch in batches:
        yield batch
        bar.update()


def _layer_table(ins: RunInspection) -> list[str]:
    lines = [
        "layer  dead      mean-k  saturation  entropy/logE  usage-H/logE  vocab-H  "
        "coherence top1 (shuffled)  jaccard (shuffled)" + ("  purity" if ins.purity else ""),
    ]
    for i, s in enumerate(ins.summaries):
        c = ins.coherence[i]
        E = len(s.utilisation)
        row = (
            f"{i:5d}  {len(s.dead):3d}/{E:<4d} {s.mean_k:6.2f}  {s.saturation:10.3f}  "
            f"{s.entropy / s.max_entropy:12.3f}  {s.usage_entropy / s.max_entropy:12.3f}  "
            f"{ins.vocab_entropy[i]:7.2f}  "
            f"{c.top1_agreement:14.3f} ({c.baseline_top1:.3f})  "
            f"{c.jaccard:7.3f} ({c.baseline_jaccard:.3f})"
        )
        if ins.purity:
            row += f"  {ins.purity[i]:6.3f}"
        lines.append(row)
    return lines


def format_inspection(ins: RunInspection, experts_shown: int = 6) -> str:
    """Plain-text tables of a :class:`RunInspection`."""
    lines = [f"{ins.run}: {ins.title}", f"routing collected over {ins.num_tokens} tokens", ""]
    lines += _layer_table(ins)
    lines.append(
        "(saturation: mean top-1 probability; entropies normalised by log E; vocab-H: "
        "mean per-expert token entropy, nats; coherence over adjacent pieces of one word)"
    )
    if ins.probe:
        lines += ["", f"overlap probe ({ins.probe_name}, {ins.probe[0].num_items} items):"]
        for i, p in enumerate(ins.probe):
            lines.append(
                f"  layer {i}: same-word Jaccard {p.observed:.3f} vs re-paired "
                f"{p.null_mean:.3f}, permutation p = {p.p_value:.4f}"
            )
    if ins.contrast:
        c0 = ins.contrast[0]
        lines += [
            "",
            f"condition contrast ({ins.contrast_name}, {c0.num_first} {c0.first!r} vs "
            f"{c0.num_second} {c0.second!r} pairs):",
        ]
        for i, c in enumerate(ins.contrast):
            lines.append(
                f"  layer {i}: Jaccard {c.first} {c.mean_first:.3f} vs {c.second} "
                f"{c.mean_second:.3f}, permutation p = {c.p_value:.4f}"
            )
    if ins.k_sweep:
        over = _sweep_budget(ins.sweep_tokens, ins.split_tokens)
        lines += ["", f"k-sweep{over}:  " + "  ".join(f"k={k}: {p:.2f}" for k, p in ins.k_sweep)]
    lines += ["", "busiest experts and their top tokens:"]
    for i, s in enumerate(ins.summaries):
        for e in s.utilisation.argsort(descending=True)[:experts_shown].tolist():
            toks = "  ".join(f"{t!r}×{c}" for t, c in ins.top_tokens[i][e])
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


def write_inspect_report(ins: RunInspection, out: Path, fmt: str = "png") -> Path:
    """Write ``inspect.md`` and its plots into the folder ``out``; return the report path.

    Args:
        ins: The inspection.
        out: The report folder (``moeblocks inspect`` uses ``RUN/reports``).
        fmt: Plot format: ``png`` (150 dpi), ``svg`` or ``pdf``.
    """
    from moeblocks.inspect import plots
    from moeblocks.sra.durable import atomic_write_text

    if fmt not in plots.FORMATS:
        raise ValueError(f"fmt must be one of {plots.FORMATS}, got {fmt!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def figure(title: str, name: str) -> list[str]:
        return [f"## {title}", "", f"![{title.lower()}]({name})", ""]

    parts = [f"# Routing inspection: `{ins.run}`", "", ins.title, ""]
    parts += [f"Routing collected over {ins.num_tokens} validation tokens.", ""]
    parts += ["```", *_layer_table(ins), "```", ""]
    util = torch.stack([s.utilisation for s in ins.summaries])
    probs = torch.stack(list(ins.mean_probs)) if ins.mean_probs else None
    name = f"inspect-utilisation.{fmt}"
    plots.plot_utilisation(util, out / name, probs, ins.corridor)
    parts += figure("Expert utilisation", name)
    if ins.anchor_sims:
        name = f"inspect-anchors.{fmt}"
        plots.plot_anchor_similarity(ins.anchor_sims, out / name)
        parts += figure("Anchor similarity", name)
    if ins.npmi:
        parts += ["## Experts × word classes (NPMI)", ""]
        for i, m in enumerate(ins.npmi):
            name = f"inspect-classes-layer{i}.{fmt}"
            plots.plot_class_heatmap(m, ins.classes, out / name, f"layer {i}: NPMI")
            parts += [f"![experts x classes, layer {i}]({name})"]
        parts += [""]
    if ins.k_sweep:
        ks, ppls = zip(*ins.k_sweep, strict=True)
        name = f"inspect-k-sweep.{fmt}"
        plots.plot_k_sweep(ks, ppls, ins.k_train, out / name, ins.sweep_tokens or None)
        parts += figure("Inference-time k-sweep", name)
    E = len(ins.summaries[0].utilisation)
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
    parts += ["## All tables", "", "```", format_inspection(ins), "```"]
    path = out / "inspect.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path
