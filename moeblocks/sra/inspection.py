"""``moeblocks inspect RUN``: the routing inspection of a trained SRA run.

Legend: W windows, S window length, L MoE layers, E experts, T tokens, V vocabulary.

:func:`inspect_run` loads a run folder, collects the routing records of every MoE layer
over (the start of) its validation split and fills the model-agnostic
:class:`~moeblocks.inspect.report.Inspection` with what an SRA run adds: word classes of
the synthetic corpus, anchor similarities of cosine routers, the k-sweep by
:func:`~moeblocks.sra.evaluate.evaluate`, the bandpass corridor and the training log.
:func:`~moeblocks.inspect.report.format_inspection` prints it and
:func:`~moeblocks.inspect.report.write_inspect_report` writes ``RUN/reports/inspect.md``
(see :mod:`moeblocks.sra.evaluate` for the layout of a run's reports).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moeblocks.inspect.anchors import anchor_similarity, anchor_traces, layer_temperatures
from moeblocks.inspect.collect import ForwardFn, RoutingSet, collect_routing, sra_forward
from moeblocks.inspect.metrics import class_counts, npmi, purity
from moeblocks.inspect.probe import ProbeItem
from moeblocks.inspect.report import (
    Inspection,
    WordClasses,
    layer_tables,
    run_probes,
    token_classes,
    word_ids_from_pieces,
)
from moeblocks.runtime.errors import UsageError
from moeblocks.sra.checkpoint import Checkpoint
from moeblocks.sra.data import WORD_CLASSES, eval_windows
from moeblocks.sra.evaluate import (
    evaluate,
    load_run,
    num_batches,
    progress_bar,
    run_corpus,
    run_folder,
)
from moeblocks.sra.model import SRATransformer
from moeblocks.sra.routing_presets import FAMILIES, k_label, trained_k
from moeblocks.sra.rundir import run_summary
from moeblocks.sra.tokencache import encode_split
from moeblocks.sra.tokenizer import encode

__all__ = ["inspect_run"]


def _word_classes(rs: RoutingSet, pieces: list[str], word_ids: Tensor) -> WordClasses:
    """Experts × the synthetic corpus's labelled word classes, per layer."""
    cls_T, names = token_classes(pieces, word_ids, WORD_CLASSES)
    counts = [class_counts(r, cls_T, len(names)) for r in rs.layers]
    return WordClasses(names, [purity(c_EC)[1] for c_EC in counts], [npmi(c) for c in counts])


def _k_sweep(
    model: SRATransformer, tokens: Tensor, ckpt: Checkpoint, max_tokens: int, ks: range, bar: Any
) -> tuple[tuple[tuple[int, float], ...], int]:
    """Perplexity at every k of ``ks`` and the predicted tokens it is over."""
    cfg = ckpt.config
    sweep, sweep_tokens = [], 0
    for k in ks:
        bar.set_description_str(f"inspect: k={k}")
        res = evaluate(model, tokens, cfg.batch_size, max_tokens, k, bar.update)
        sweep.append((k, res.ppl))
        sweep_tokens = res.tokens
    return tuple(sweep), sweep_tokens


def _title(ckpt: Checkpoint) -> str:
    cfg = ckpt.config
    return (
        f"{cfg.n_layers} layers, FFN `{cfg.ffn}`, {cfg.num_experts} experts, "
        f"k {k_label(cfg)}, step {ckpt.step}, data `{ckpt.data}`"
    )


def _trace_sentence(
    model: SRATransformer, forward: ForwardFn, ids: list[int], show: Any
) -> dict[str, Any]:
    """The token-by-token trace of one sentence, as :class:`Inspection` fields."""
    routings = forward(torch.tensor([ids], dtype=torch.long))
    trace = anchor_traces(routings, layer_temperatures(model))
    return {"sentence": [show(i) for i in ids], "trace": trace}


def _run_fields(model: SRATransformer, ckpt: Checkpoint, run: Path) -> dict[str, Any]:
    """What only an SRA run has: anchors, the corridor, its k schedule and training log."""
    cfg = ckpt.config
    bandpass = cfg.ffn in ("cosine", "linear") and cfg.balance == "bandpass"
    curriculum = cfg.ffn not in FAMILIES and cfg.k_start != cfg.k_final
    sims = tuple(
        anchor_similarity(m.router.anchors)
        for m in model.moe_layers
        if getattr(m.router, "anchors", None) is not None
    )
    return {
        "anchor_sims": sims,
        # The corridor and the k curriculum are SRA's routers' (a family preset has neither).
        "corridor": (cfg.band_floor, cfg.band_ceiling) if bandpass else None,
        "k_switch": cfg.k_switch_step if curriculum else None,
        "k_train": trained_k(cfg),
        "training": tuple(run_summary(run_folder(run))["train"]),
    }


def inspect_run(
    run: Path,
    text: str | None = None,
    max_tokens: int = 8192,
    device: str = "cpu",
    k_sweep: bool = True,
    probes: Sequence[ProbeItem] | None = None,
    data: str | None = None,
    progress: bool = False,
) -> Inspection:
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

    Raises:
        UsageError: For a dense run (no routing), or see :func:`~moeblocks.sra.evaluate.load_run`.
    """
    run = Path(run)
    model, tok, ckpt = load_run(run, device, data)
    model.eval()
    cfg = ckpt.config
    if not model.moe_layers:
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

    def show(i: int) -> str:
        return tok.decode([i])

    def enc(s: str) -> list[int]:
        return encode(tok, s).tolist()

    tables = layer_tables(rs, word_ids, cfg.vocab_size, show)
    synthetic = ckpt.data == "synthetic"
    bar.set_description_str("inspect: probes")
    # Built-in contrasts list the condition expected to overlap more first.
    contrast_set = "synthetic-swap" if synthetic else "english-senses"
    found = run_probes(forward, enc, probes, "synthetic" if synthetic else "english", contrast_set)
    bar.update(2)
    sweep, sweep_tokens = _k_sweep(model, tokens, ckpt, max_tokens, ks, bar)
    bar.close()
    if text is None:
        text = next((ln for ln in corpus.valid.splitlines() if ln.strip()), "")
    return Inspection(
        source=run,
        title=_title(ckpt),
        num_tokens=rs.num_tokens,
        tables=tables,
        probes=found,
        k_sweep=sweep,
        sweep_tokens=sweep_tokens,
        split_tokens=eval_windows(tokens, cfg.seq_len)[1].numel(),
        word_classes=_word_classes(rs, pieces, word_ids) if synthetic else None,
        mean_probs=tuple(r.probs.mean(0) for r in rs.layers),
        **_trace_sentence(model, forward, enc(text)[: cfg.seq_len] or [0], show),
        **_run_fields(model, ckpt, run),
    )


def _counted(batches: Iterable[Tensor], bar: Any) -> Iterator[Tensor]:
    for batch in batches:
        yield batch
        bar.update()
