"""Evaluation of a trained SRA model: perplexity, dead experts, inference-time k-sweep.

Legend: W validation windows, S sequence length, V vocabulary, L MoE layers, E experts.

A *dead* expert receives no token (in any of a token's k slots) over the evaluation
set. The k-sweep re-evaluates with every MoE layer forced to k = 1 … k_train + 2; the
SRA paper reports a free gain from running above the training k.

Every report of a run goes to one folder, :func:`report_dir` (``RUN/reports/``):

| file | written by |
|---|---|
| `eval.json` | `moeblocks eval` and `demo` (:func:`eval_record`) |
| `demo.md` | `moeblocks demo`, with `eval-*` and `training-*` plots |
| `inspect.md` | `moeblocks inspect`, with `inspect-*` and `training-*` plots |
| `generate.md`, `generate.json` | `moeblocks generate` (:mod:`moeblocks.sra.generate`) |

Plots are named ``<command>-<concept>.<png|svg|pdf>``; the ``training-*`` plots are drawn
from ``log.jsonl`` and are the same whichever command wrote them. Perplexities differ
between commands when they read different numbers of validation tokens (``eval``: all
of them unless ``--max-tokens``; ``inspect``: 8192 by default); each says how many.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from moeblocks.runtime.device import resolve_device
from moeblocks.runtime.errors import UsageError
from moeblocks.runtime.progress import Progress, start_progress
from moeblocks.sra.checkpoint import (
    Checkpoint,
    check_corpus,
    find_checkpoint,
    load_weights,
    note_skipped,
    with_data,
)
from moeblocks.sra.config import SRAConfig
from moeblocks.sra.data import Corpus, eval_windows, load_corpus
from moeblocks.sra.model import SRATransformer
from moeblocks.sra.routing_presets import FAMILIES, k_label, trained_k

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "EvalResult",
    "RunEval",
    "eval_record",
    "evaluate",
    "evaluate_run",
    "expert_top_tokens",
    "format_run_eval",
    "load_run",
    "progress_bar",
    "report_dir",
    "run_corpus",
    "run_folder",
    "write_eval_json",
]


@dataclass(frozen=True)
class EvalResult:
    """Validation metrics at one k.

    Attributes:
        loss: Mean next-token cross-entropy, nats per token.
        ppl: Perplexity, ``exp(loss)``.
        tokens: Number of predicted tokens.
        k: Experts per token used (None: the schedule's current k).
        counts: Routed slots per expert and MoE layer, int64 ``[L, E]`` (``[0, E]``
            for a dense model).
        dropped: Fraction of the routed copies (all layers) that a capacity limit
            dropped; 0 without one.
    """

    loss: float
    ppl: float
    tokens: int
    k: int | None
    counts: Tensor
    dropped: float = 0.0

    @property
    def dead_per_layer(self) -> list[float]:
        """Fraction of experts of each MoE layer that received no token."""
        return [(row == 0).float().mean().item() for row in self.counts]


def _batches(tokens: Int[Tensor, " N"], seq_len: int, batch_size: int, max_tokens: int):  # type: ignore[no-untyped-def]
    x_WS, y_WS = eval_windows(tokens, seq_len, max_tokens)
    for i in range(0, len(x_WS), batch_size):
        yield x_WS[i : i + batch_size], y_WS[i : i + batch_size]


def num_batches(tokens: Int[Tensor, " N"], seq_len: int, batch_size: int, max_tokens: int) -> int:
    """Forward passes :func:`evaluate` makes over these tokens (for progress bars)."""
    windows = len(eval_windows(tokens, seq_len, max_tokens)[0])
    return -(-windows // batch_size)


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "batch") -> Progress:
    """A progress display on stderr (:func:`moeblocks.runtime.progress.start_progress`).

    A tqdm bar on a terminal, a plain line every 10 % or 30 s elsewhere (logs, CI);
    silent when not enabled. It has ``update(n)``, ``set_description_str(text)`` and
    ``close()``.
    """
    return start_progress(total, desc, enabled, unit=unit, leave=False)


@torch.no_grad()
def evaluate(
    model: SRATransformer,
    tokens: Int[Tensor, " N"],
    batch_size: int,
    max_tokens: int = 0,
    k: int | None = None,
    on_batch: Callable[[], None] | None = None,
) -> EvalResult:
    """Cross-entropy, perplexity and expert usage over validation windows.

    Args:
        model: The model (put in eval mode for the call, restored after).
        tokens: Validation tokens (on any device).
        batch_size: Windows per forward pass.
        max_tokens: Evaluate about this many tokens from the start (0 = all).
        k: Force every MoE layer to this k; None follows the schedule.
        on_batch: Called after every forward pass (progress bars).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    L, E = len(model.moe_layers), model.config.num_experts
    counts_LE = torch.zeros(L, E, dtype=torch.long, device=device)
    dropped_2 = torch.zeros(2, dtype=torch.long, device=device)  # dropped, all copies
    total, n = 0.0, 0
    try:
        for x_BS, y_BS in _batches(tokens, model.config.seq_len, batch_size, max_tokens):
            x_BS, y_BS = x_BS.to(device), y_BS.to(device)
            res = model(x_BS, k=k)
            total += F.cross_entropy(
                res.logits.flatten(0, 1).float(), y_BS.flatten(), reduction="sum"
            ).item()
            n += y_BS.numel()
            for layer, routing in enumerate(res.routings):
                counts_LE[layer] += torch.bincount(routing.experts.flatten(), minlength=E)
                dropped_2[0] += routing.num_dropped
                dropped_2[1] += routing.experts.numel()
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    loss = total / n
    dropped, copies = dropped_2.tolist()
    return EvalResult(
        loss, math.exp(loss), n, k, counts_LE.cpu(), dropped / copies if copies else 0.0
    )


@torch.no_grad()
def expert_top_tokens(
    model: SRATransformer,
    tokens: Int[Tensor, " N"],
    layer: int,
    batch_size: int,
    max_tokens: int = 0,
    n: int = 8,
) -> list[list[tuple[int, int]]]:
    """For every expert of one MoE layer, the input tokens routed to it most often.

    A token counts once per slot (any of its k choices) that picks the expert.

    Returns:
        Per expert, up to ``n`` ``(token_id, count)`` pairs, most frequent first.
    """
    layers = model.moe_layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer must be in [0, {len(layers)}), got {layer}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    E, V = model.config.num_experts, model.config.vocab_size
    counts_EV = torch.zeros(E * V, dtype=torch.long, device=device)
    try:
        for x_BS, _ in _batches(tokens, model.config.seq_len, batch_size, max_tokens):
            x_BS = x_BS.to(device)
            routing = model(x_BS).routings[layer]
            ids_TK = x_BS.reshape(-1, 1).expand_as(routing.experts)
            counts_EV += torch.bincount((routing.experts * V + ids_TK).flatten(), minlength=E * V)
    finally:
        model.train(was_training)
    top_counts, top_ids = counts_EV.view(E, V).cpu().topk(min(n, V), dim=-1)
    return [
        [(int(i), int(c)) for i, c in zip(ids, cs, strict=False) if c > 0]
        for ids, cs in zip(top_ids, top_counts, strict=False)
    ]


def load_run(
    path: Path,
    device: str = "cpu",
    data: str | None = None,
    encoding: str | None = None,
    need_data: bool = True,
) -> tuple[SRATransformer, Tokenizer, Checkpoint]:
    """Rebuild the model and tokeniser of a run folder (or a checkpoint folder).

    Takes the newest checkpoint that verifies (saying on stderr which newer ones it
    skipped, and why) and checks its tokeniser against the SHA-256 it recorded.

    Args:
        path: The run folder or checkpoint folder.
        device: Where to put the model.
        data: The data to evaluate on (``--data``); None takes the checkpoint's, which
            is followed only when it is built in or lies inside ``path``.
        encoding: Text encoding of ``data`` (default: the checkpoint's).
        need_data: False when the caller reads no corpus (``generate``): the data path
            is then not checked.

    Returns:
        The model, the tokeniser and the checkpoint, whose ``data`` / ``encoding`` name
        the source to read with :func:`run_corpus`.

    Raises:
        UsageError: When the folder holds no checkpoint that verifies, its tokeniser is
            not the one recorded, or its data path lies outside ``path`` and no
            ``data`` is given.
    """
    from moeblocks.sra.tokenizer import load_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"run folder {path} does not exist")
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise UsageError(f"{path} holds no checkpoint; train it first")
    note_skipped(ckpt)
    if need_data or data is not None:
        ckpt = with_data(ckpt, path, data, encoding)
    tok = load_tokenizer(
        ckpt.path / "tokenizer.json",
        sha256=ckpt.tokenizer_sha256,
        vocab_size=ckpt.config.vocab_size,
    )
    model = SRATransformer(ckpt.config).to(resolve_device(device))
    load_weights(model, ckpt, ckpt.config)
    return model, tok, ckpt


def run_corpus(ckpt: Checkpoint) -> Corpus:
    """Load the corpus a checkpoint from :func:`load_run` names, checked by fingerprint.

    Raises:
        UsageError: When the text is not the one the run was trained on.
    """
    corpus = load_corpus(ckpt.data, ckpt.encoding)
    check_corpus(corpus, ckpt)
    return corpus


@dataclass(frozen=True)
class RunEval:
    """Everything ``moeblocks eval`` reports about a run.

    Attributes:
        checkpoint: The evaluated checkpoint.
        result: Metrics at the training k (the schedule's k at the checkpoint's step).
        sweep: Metrics at k = 1 … k_train + 2 (empty for a dense model).
    """

    checkpoint: Checkpoint
    result: EvalResult
    sweep: tuple[EvalResult, ...]


def evaluate_run(
    model: SRATransformer,
    tokens: Int[Tensor, " N"],
    ckpt: Checkpoint,
    max_tokens: int = 0,
    progress: bool = False,
) -> RunEval:
    """Validation metrics of a loaded run plus its inference-time k-sweep.

    Args:
        model: The loaded model.
        tokens: Validation tokens.
        ckpt: Its checkpoint.
        max_tokens: Evaluate about this many tokens (0 = all).
        progress: A progress bar over the forward passes, on stderr.
    """
    cfg = ckpt.config
    ks = list(range(1, min(cfg.k_final + 2, cfg.num_experts) + 1)) if model.moe_layers else []
    per_pass = num_batches(tokens, cfg.seq_len, cfg.batch_size, max_tokens)
    bar = progress_bar(per_pass * (1 + len(ks)), "eval", progress)
    try:
        result = evaluate(model, tokens, cfg.batch_size, max_tokens, on_batch=bar.update)
        sweep = []
        for k in ks:
            bar.set_description_str(f"eval k={k}")
            sweep.append(evaluate(model, tokens, cfg.batch_size, max_tokens, k, bar.update))
    finally:
        bar.close()
    return RunEval(ckpt, result, tuple(sweep))


def run_folder(path: Path) -> Path:
    """The run folder of a run or checkpoint folder (``RUN/checkpoints/step-N`` -> ``RUN``)."""
    path = Path(path)
    if path.parent.name == "checkpoints" and path.name.startswith("step-"):
        return path.parent.parent
    return path


def report_dir(path: Path) -> Path:
    """Where the reports of a run go: ``RUN/reports`` (see the module docstring).

    A checkpoint folder's reports go to its run's folder: a checkpoint folder holds only
    what its manifest lists.
    """
    return run_folder(path) / "reports"


def _k_at(config: SRAConfig, step: int) -> int:
    """The k the routers use after ``step`` training steps (a family's k is fixed)."""
    if config.ffn in FAMILIES or step >= config.k_switch_step:
        return trained_k(config)
    return config.k_start


def eval_record(ev: RunEval, command: str = "") -> dict[str, Any]:
    """What ``eval.json`` holds: a JSON-ready dict of a :class:`RunEval`.

    Keys: ``command``; ``checkpoint`` (``path``, ``step``); ``data``; ``config`` (the
    run's :class:`~moeblocks.sra.config.SRAConfig` as a dict); ``tokens`` (predicted
    tokens the numbers are over); ``loss`` (nats/token) and ``perplexity`` at the
    training schedule's k (``k``); ``dead_experts`` (per MoE layer: ``count``,
    ``fraction`` and the expert ``ids``); ``expert_counts`` (per layer, routed slots
    per expert); ``k_sweep`` (per k: ``k``, ``loss``, ``perplexity``, ``tokens``);
    ``moeblocks`` (version); ``written`` (UTC time).
    """
    from moeblocks._version import __version__

    r, ck = ev.result, ev.checkpoint
    dead = [
        {"count": int((row == 0).sum()), "fraction": f,
         "ids": (row == 0).nonzero().flatten().tolist()}
        for row, f in zip(r.counts, r.dead_per_layer, strict=True)
    ]  # fmt: skip
    return {
        "command": command,
        "checkpoint": {"path": str(ck.path), "step": ck.step},
        "data": ck.data,
        "config": ck.config.to_dict(),
        "tokens": r.tokens,
        "loss": r.loss,
        "perplexity": r.ppl,
        "k": _k_at(ck.config, ck.step),
        "dead_experts": dead,
        "expert_counts": r.counts.tolist(),
        "k_sweep": [
            {"k": s.k, "loss": s.loss, "perplexity": s.ppl, "tokens": s.tokens} for s in ev.sweep
        ],
        "moeblocks": __version__,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_eval_json(ev: RunEval, out: Path, command: str = "") -> Path:
    """Write :func:`eval_record` to ``out/eval.json`` (atomically); return its path."""
    from moeblocks.runtime.durable import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eval.json"
    atomic_write_text(path, json.dumps(eval_record(ev, command), indent=1) + "\n")
    return path


def format_run_eval(ev: RunEval, k_train: int) -> str:
    """Plain-text report: perplexity, dead experts per layer, k-sweep table."""
    r, cfg = ev.result, ev.checkpoint.config
    lines = [
        f"checkpoint {ev.checkpoint.path} (step {ev.checkpoint.step}, ffn {cfg.ffn}, "
        f"{cfg.num_experts} experts, k {k_label(cfg)})",
        f"validation: loss {r.loss:.4f} nats/token, perplexity {r.ppl:.2f} over {r.tokens} tokens",
    ]
    if len(r.counts):
        E = r.counts.shape[1]
        dead = "  ".join(
            f"layer {i}: {int((row == 0).sum())}/{E} ({100 * f:.1f}%)"
            for i, (row, f) in enumerate(zip(r.counts, r.dead_per_layer, strict=False))
        )
        lines.append(f"dead experts: {dead}")
        lines.append("k-sweep (inference-time experts per token):")
        lines.append("    k   perplexity   vs k_train")
        base = next((s.ppl for s in ev.sweep if s.k == k_train), r.ppl)
        for s in ev.sweep:
            mark = "*" if s.k == k_train else " "
            lines.append(f"  {mark}{s.k:2d}   {s.ppl:10.2f}   {s.ppl - base:+8.2f}")
        lines.append("  (* = k used at the end of training)")
    return "\n".join(lines)
