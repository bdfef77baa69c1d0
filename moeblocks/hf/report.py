"""``moeblocks inspect --hf DIR``: the routing report of a local Hugging Face MoE checkpoint.

Legend: W windows, S window length, T tokens, E experts, K experts per token, L MoE
layers, V vocabulary.

:func:`inspect_hf` loads a ``save_pretrained`` folder (config.json + weights; nothing is
downloaded), collects every MoE layer's routing over a text with
:func:`~moeblocks.hf.capture_routing` and computes the metrics of
:mod:`moeblocks.inspect` into the same :class:`~moeblocks.inspect.report.RunInspection`
an SRA run gets; :func:`format_hf_inspection` and :func:`write_hf_report` print it and
write ``inspect.md`` with the plots, plus notes on what does not apply to an HF model
(anchors). The inference-time k-sweep swaps the blocks for moeblocks layers
(:func:`~moeblocks.hf.swap_moe_blocks`) and sets k on each through
:func:`~moeblocks.inspect.intervene`. transformers is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor, nn

from moeblocks._optional import require
from moeblocks.hf.capture import capture_routing
from moeblocks.hf.convert import SUPPORTED, family_of
from moeblocks.hf.swap import HFMoEBlock, swap_moe_blocks
from moeblocks.inspect.anchors import anchor_traces
from moeblocks.inspect.collect import collect_routing
from moeblocks.inspect.interventions import intervene
from moeblocks.inspect.probe import (
    BUILTIN_PROBES,
    ProbeItem,
    run_condition_probe,
    run_overlap_probe,
)
from moeblocks.inspect.report import (
    RunInspection,
    format_inspection,
    layer_tables,
    word_ids_from_pieces,
    write_inspect_report,
)

__all__ = [
    "CheckpointError",
    "HFInspection",
    "format_hf_inspection",
    "inspect_hf",
    "load_checkpoint",
    "write_hf_report",
]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class CheckpointError(ValueError):
    """The folder is not a local HF MoE checkpoint this command can inspect."""


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer or None)`` of a local ``save_pretrained`` folder, in eval mode.

    The model loads with ``AutoModelForCausalLM.from_pretrained(folder,
    local_files_only=True)`` in the checkpoint's dtype; the tokenizer with
    ``AutoTokenizer`` when the folder holds tokenizer files, else None.

    Raises:
        CheckpointError: For a missing folder, one without config.json, or a model
            type that is not a causal LM.
        ImportError: Without transformers; the message names ``moeblocks[hf]``.
    """
    tf = require("transformers", extra="hf", feature="moeblocks inspect --hf")
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"--hf {folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"--hf {folder}: no config.json; expected a folder written by save_pretrained"
        )
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError) as err:
        raise CheckpointError(f"--hf {folder}: cannot load a causal LM from it ({err})") from err
    tok = None
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        tok = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.to(device).eval(), tok


@dataclass(frozen=True)
class HFInspection:
    """The inspection of an HF checkpoint: the SRA report's record plus notes.

    Attributes:
        inspection: Metrics, probes, k-sweep and sentence trace (``anchor_sims``,
            ``classes``, ``purity`` and ``npmi`` stay empty).
        notes: Lines on what does not apply to this model and why.
    """

    inspection: RunInspection
    notes: list[str]


def _windows(ids: Tensor, seq_len: int, max_tokens: int) -> Int[Tensor, "W S"]:
    n = min(int(ids.numel()), max_tokens)
    if n == 0:
        raise CheckpointError("the evaluation text gave no tokens")
    if n < seq_len:
        return ids[:n].reshape(1, n)
    W = n // seq_len
    return ids[: W * seq_len].reshape(W, seq_len)


@torch.no_grad()
def _perplexity(model: nn.Module, x_WS: Tensor, batch_size: int) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in x_WS.split(batch_size):
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / max(count, 1))


def _k_sweep(
    model: nn.Module, x_WS: Tensor, batch_size: int, k_train: int
) -> list[tuple[int, float]]:
    """Perplexity at k = 1 … k_train + 2 on the swapped model (k forced by intervene)."""
    adapters = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    E = adapters[0].layer.num_experts
    sweep = []
    for k in range(1, min(k_train + 2, E) + 1):
        try:
            with ExitStack() as stack:
                for a in adapters:
                    stack.enter_context(intervene(a.layer, k=k))
                sweep.append((k, _perplexity(model, x_WS, batch_size)))
        except ValueError:  # a selection that cannot choose k (group-limited top-k)
            continue
    return sweep


def _try(fn: Callable[[], list]) -> list:
    try:
        return fn()
    except ValueError:  # the tokeniser merges a target with its neighbours
        return []


def inspect_hf(
    folder: str | Path,
    corpus: str,
    *,
    data_name: str = "text",
    text: str | None = None,
    max_tokens: int = 8192,
    seq_len: int = 128,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    k_sweep: bool = True,
    probes: Sequence[ProbeItem] | None = None,
) -> HFInspection:
    """Collect the routing of an HF checkpoint over ``corpus`` and compute every metric.

    Args:
        folder: A local ``save_pretrained`` folder (config.json + safetensors).
        corpus: The evaluation text (its first ``max_tokens`` tokens are used).
        data_name: What the text is, for the title.
        text: Sentence to trace token by token (default: the first non-empty line).
        max_tokens: Tokens to collect routing on (and evaluate the k-sweep on).
        seq_len: Window length S the text is cut into.
        batch_size: Windows per forward.
        device: Where to run the model.
        k_sweep: Also evaluate perplexity at k = 1 … K + 2 (one pass per k).
        probes: Overlap-probe items (default: the built-in ``english`` set and the
            ``english-senses`` contrast); they need a tokenizer.

    Raises:
        CheckpointError: See :func:`load_checkpoint`; also for a model without a
            supported sparse-MoE block.
    """
    model, tok = load_checkpoint(folder, device)
    families = sorted({f.name for m in model.modules() if (f := family_of(m)) is not None})
    if not families:
        raise CheckpointError(
            f"--hf {folder}: {type(model).__name__} has no supported sparse-MoE block "
            f"({', '.join(SUPPORTED)})"
        )
    V = int(model.config.vocab_size)
    notes = [
        "Anchors: not applicable. Hugging Face routers score tokens with a linear map, not "
        "with anchors: there is no anchor-similarity plot, and `near` in the sentence trace "
        "lists each token's highest router logits instead of its nearest anchors.",
        "Word classes (purity, NPMI): not applicable; they need the labelled synthetic corpus.",
    ]
    if tok is not None:
        V = max(V, len(tok))

        def encode(s: str) -> list[int]:
            return list(tok(s, add_special_tokens=False)["input_ids"])

        def show(i: int) -> str:
            return tok.decode([i])

        ids = torch.tensor(encode(corpus[: max_tokens * 16]), dtype=torch.long)
    else:
        notes.append(
            f"No tokenizer in {folder}: the token ids are the text's UTF-8 bytes (mod the "
            "vocabulary size), tokens are shown as ids, and word coherence and the probes "
            "are skipped."
        )

        def encode(s: str) -> list[int]:
            return [b % V for b in s.encode("utf-8")]

        def show(i: int) -> str:
            return f"<{i}>"

        ids = torch.tensor(encode(corpus[: max_tokens * 4]), dtype=torch.long)
    x_WS = _windows(ids, seq_len, max_tokens)
    dev = next(model.parameters()).device

    def call(ids_BS: Tensor) -> object:
        return model(input_ids=ids_BS.to(dev), use_cache=False)

    with capture_routing(model) as rec:
        forward = rec.forward_fn(call)
        rs = collect_routing(forward, x_WS.split(batch_size))
        token_ids = rs.token_ids.tolist()
        if tok is not None:
            # SentencePiece marks a word start with "▁"; the piece rules read BPE's "Ġ".
            pieces = [p.replace("▁", "Ġ") for p in tok.convert_ids_to_tokens(token_ids)]
            word_ids = word_ids_from_pieces(pieces)
        else:
            word_ids = torch.full((len(token_ids),), -1, dtype=torch.long)
        summaries, coherence, vent, tops = layer_tables(rs, word_ids, V, show)
        probe, contrast, probe_name, contrast_name = [], [], "", ""
        if tok is not None:
            items = BUILTIN_PROBES["english"] if probes is None else probes
            probe = _try(lambda: run_overlap_probe(forward, encode, items, 1000))
            probe_name = ("english" if probes is None else "custom") if probe else ""
            pairs = BUILTIN_PROBES["english-senses"] if probes is None else probes
            labels = list(dict.fromkeys(it.condition for it in pairs if it.condition))
            if len(labels) == 2:
                contrast = _try(lambda: run_condition_probe(forward, encode, pairs, *labels, 1000))
            contrast_name = ("english-senses" if probes is None else "custom") if contrast else ""
        if text is None:
            text = next((ln for ln in corpus.splitlines() if ln.strip()), "")
        sent_ids = encode(text)[: x_WS.shape[1]] or [0]
        sent_routings = forward(torch.tensor([sent_ids], dtype=torch.long))
    trace = anchor_traces(sent_routings, [None] * len(sent_routings))
    k_train = rs.layers[0].top_k
    sweep: list[tuple[int, float]] = []
    if k_sweep:
        swap_moe_blocks(model)
        sweep = _k_sweep(model, x_WS, batch_size, k_train)
        notes.append(
            "k-sweep: the MoE blocks were swapped for moeblocks layers and k set on every "
            "layer with moeblocks.inspect.intervene."
        )
    title = (
        f"Hugging Face `{type(model).__name__}` ({', '.join(families)}), {rs.num_layers} MoE "
        f"layers, {rs.layers[0].num_experts} experts, k {k_train}, data `{data_name}`"
    )
    ins = RunInspection(
        Path(folder), title, rs.num_tokens, summaries, coherence, vent, tops, [], [], [],
        probe_name, probe, contrast_name, contrast, sweep, k_train, [],
        [show(i) for i in sent_ids], trace,
    )  # fmt: skip
    return HFInspection(ins, notes)


def format_hf_inspection(hins: HFInspection) -> str:
    """Plain-text tables of an :class:`HFInspection`, its notes first."""
    return "\n".join([*hins.notes, "", format_inspection(hins.inspection)])


def write_hf_report(hins: HFInspection, out: str | Path, fmt: str = "png") -> Path:
    """Write ``inspect.md`` and its plots (``fmt``: png, svg or pdf) into the folder ``out``.

    The report is the one :func:`~moeblocks.inspect.report.write_inspect_report` writes,
    with the notes inserted below the title; returns its path.
    """
    path = write_inspect_report(hins.inspection, Path(out), fmt)
    report = path.read_text(encoding="utf-8")
    notes = "\n".join(f"- {line}" for line in hins.notes)
    head, sep, rest = report.partition("\n\n```")
    report = f"{head}\n\n{notes}{sep}{rest}" if sep else f"{report}\n{notes}\n"
    path.write_text(report, encoding="utf-8")
    return path
