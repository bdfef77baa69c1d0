"""``moeblocks inspect --hf DIR``: the routing report of a local Hugging Face MoE checkpoint.

Legend: W windows, S window length, T tokens, E experts, K experts per token, L MoE
layers, V vocabulary.

:func:`inspect_hf` loads a ``save_pretrained`` folder (config.json + weights; nothing is
downloaded), collects every MoE layer's routing over a text with
:func:`~moeblocks.hf.capture_routing` and computes the metrics of
:mod:`moeblocks.inspect` into the model-agnostic :class:`~moeblocks.inspect.report.Inspection`,
with notes on what does not apply to an HF model (anchors, word classes);
:func:`~moeblocks.inspect.report.format_inspection` and
:func:`~moeblocks.inspect.report.write_inspect_report` print it and write ``inspect.md``
with the plots. The inference-time k-sweep swaps the blocks for moeblocks layers
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
from moeblocks.inspect.collect import RoutingSet, collect_routing
from moeblocks.inspect.interventions import intervene
from moeblocks.inspect.probe import ProbeItem
from moeblocks.inspect.report import (
    Inspection,
    LayerTables,
    ProbeResults,
    layer_tables,
    run_probes,
    word_ids_from_pieces,
)
from moeblocks.routing import Routing
from moeblocks.runtime.errors import CheckpointError

__all__ = ["CheckpointError", "inspect_hf", "load_checkpoint"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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


_NOTES = (
    "Anchors: not applicable. Hugging Face routers score tokens with a linear map, not "
    "with anchors: there is no anchor-similarity plot, and `near` in the sentence trace "
    "lists each token's highest router logits instead of its nearest anchors.",
    "Word classes (purity, NPMI): not applicable; they need the labelled synthetic corpus.",
)


@dataclass(frozen=True)
class _Text:
    """How a checkpoint turns text into ids and ids into what the report shows."""

    encode: Callable[[str], list[int]]
    show: Callable[[int], str]
    pieces: Callable[[list[int]], Tensor] | None  # word id of every token (None: no words)
    vocab_size: int
    chars_per_token: int  # how much of the corpus to encode for max_tokens tokens


def _text_of(tok: Any, vocab_size: int) -> _Text:
    """The tokenizer's view of text, or UTF-8 bytes (mod V) where the folder has none."""
    if tok is None:
        V = vocab_size
        return _Text(lambda s: [b % V for b in s.encode("utf-8")], lambda i: f"<{i}>", None, V, 4)

    def word_ids(ids: list[int]) -> Tensor:
        # SentencePiece marks a word start with "▁"; the piece rules read BPE's "Ġ".
        return word_ids_from_pieces([p.replace("▁", "Ġ") for p in tok.convert_ids_to_tokens(ids)])

    return _Text(
        lambda s: list(tok(s, add_special_tokens=False)["input_ids"]),
        lambda i: tok.decode([i]),
        word_ids,
        max(vocab_size, len(tok)),
        16,
    )


def _families(model: nn.Module, folder: str | Path) -> list[str]:
    families = sorted({f.name for m in model.modules() if (f := family_of(m)) is not None})
    if not families:
        raise CheckpointError(
            f"--hf {folder}: {type(model).__name__} has no supported sparse-MoE block "
            f"({', '.join(SUPPORTED)})"
        )
    return families


def _collect(
    model: nn.Module,
    has_tokenizer: bool,
    txt: _Text,
    x_WS: Tensor,
    batch_size: int,
    probes: Sequence[ProbeItem] | None,
    text: str,
) -> tuple[RoutingSet, LayerTables, ProbeResults, list[int], Sequence[Routing]]:
    """Routing over the windows, its tables, the probes and the traced sentence's routing."""
    dev = next(model.parameters()).device

    def call(ids_BS: Tensor) -> object:
        return model(input_ids=ids_BS.to(dev), use_cache=False)

    with capture_routing(model) as rec:
        forward = rec.forward_fn(call)
        rs = collect_routing(forward, x_WS.split(batch_size))
        token_ids = rs.token_ids.tolist()
        no_words = torch.full((len(token_ids),), -1, dtype=torch.long)
        word_ids = no_words if txt.pieces is None else txt.pieces(token_ids)
        tables = layer_tables(rs, word_ids, txt.vocab_size, txt.show)
        found = ProbeResults()
        if has_tokenizer:
            found = run_probes(forward, txt.encode, probes, "english", "english-senses")
        sent_ids = txt.encode(text)[: x_WS.shape[1]] or [0]
        sent_routings = forward(torch.tensor([sent_ids], dtype=torch.long))
    return rs, tables, found, sent_ids, sent_routings


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
) -> Inspection:
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
    families = _families(model, folder)
    txt = _text_of(tok, int(model.config.vocab_size))
    notes = list(_NOTES)
    if tok is None:
        notes.append(
            f"No tokenizer in {folder}: the token ids are the text's UTF-8 bytes (mod the "
            "vocabulary size), tokens are shown as ids, and word coherence and the probes "
            "are skipped."
        )
    ids = torch.tensor(txt.encode(corpus[: max_tokens * txt.chars_per_token]), dtype=torch.long)
    x_WS = _windows(ids, seq_len, max_tokens)
    if text is None:
        text = next((ln for ln in corpus.splitlines() if ln.strip()), "")
    rs, tables, found, sent_ids, sent_routings = _collect(
        model, tok is not None, txt, x_WS, batch_size, probes, text
    )
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
    return Inspection(
        source=Path(folder),
        title=title,
        num_tokens=rs.num_tokens,
        tables=tables,
        sentence=[txt.show(i) for i in sent_ids],
        trace=anchor_traces(sent_routings, [None] * len(sent_routings)),
        probes=found,
        k_sweep=tuple(sweep),
        k_train=k_train,
        notes=tuple(notes),
    )
