"""Sample text from a trained SRA run and trace the experts every token is routed to.

Legend: S context length (at most ``seq_len``), V vocabulary, L MoE layers, K experts
per token.

:func:`generate` writes one token at a time: a forward pass over the last ``seq_len``
tokens (no KV cache: the reference model recomputes the window, which a tiny model does
in milliseconds) gives the next-token distribution, which is tempered, cut to its top-p
nucleus and sampled with a seeded generator on the CPU, so a seed gives the same text on
any device. The routing trace of a token is the routing it gets when it is read: the
K experts each MoE layer sends it to, with their combine weights; for the prompt's
tokens it comes from the first pass, for a generated token from the pass that reads it
back. :func:`format_generation` prints the trace and :func:`write_generation` writes it
to ``RUN/reports/generate.md`` and ``generate.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from moeblocks.runtime.errors import UsageError
from moeblocks.sra.model import SRAOutput, SRATransformer

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "Generation",
    "TokenTrace",
    "format_generation",
    "generate",
    "sample_token",
    "write_generation",
]


@dataclass(frozen=True)
class TokenTrace:
    """One token and where each MoE layer routed it.

    Attributes:
        id: Token id.
        text: The token decoded on its own (a piece of a multi-byte character shows as
            ``�``; :attr:`Generation.text` decodes the whole text).
        prob: Probability the sampler gave it, after temperature and top-p (None for a
            prompt token).
        experts: Per MoE layer, its K expert ids, first choice first.
        weights: Per MoE layer, their combine weights.
    """

    id: int
    text: str
    prob: float | None
    experts: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class Generation:
    """A sampled continuation with the routing trace of every token.

    Attributes:
        run: The run (or checkpoint) folder.
        step: The checkpoint's step.
        prompt: The prompt text.
        text: The generated text (without the prompt), decoded as a whole.
        prompt_tokens: The prompt's tokens (its last ``seq_len``) with their routing.
        tokens: The generated tokens with their routing.
        k: Experts per token in every layer (the schedule's k, or the one asked for).
        temperature: Softmax temperature (0: greedy).
        top_p: Nucleus mass kept before sampling.
        seed: Seed of the sampler.
    """

    run: str
    step: int
    prompt: str
    text: str
    prompt_tokens: tuple[TokenTrace, ...]
    tokens: tuple[TokenTrace, ...]
    k: int
    temperature: float
    top_p: float
    seed: int


def sample_token(
    logits_V: Float[Tensor, " V"], temperature: float, top_p: float, generator: torch.Generator
) -> tuple[int, float]:
    """Draw one token id from ``softmax(logits / temperature)`` cut to its top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p``
    (always at least the most likely one), renormalised. Temperature 0 is greedy.

    Returns:
        The id and its probability under the distribution sampled from.
    """
    logits_V = logits_V.detach().float().cpu()
    if temperature == 0:
        return int(logits_V.argmax()), 1.0
    p_V = torch.softmax(logits_V / temperature, dim=-1)
    if top_p < 1.0:
        sorted_V, order_V = p_V.sort(descending=True)
        keep_V = (sorted_V.cumsum(0) - sorted_V) < top_p  # mass before it not yet top_p
        p_V = torch.zeros_like(p_V).scatter(0, order_V[keep_V], sorted_V[keep_V])
        p_V = p_V / p_V.sum()
    i = int(torch.multinomial(p_V, 1, generator=generator))
    return i, float(p_V[i])


def _trace(res: SRAOutput, t: int, tok: Tokenizer, i: int, prob: float | None) -> TokenTrace:
    return TokenTrace(
        i,
        tok.decode([i]),
        prob,
        tuple(tuple(r.experts[t].tolist()) for r in res.routings),
        tuple(tuple(round(w, 4) for w in r.weights[t].float().tolist()) for r in res.routings),
    )


@torch.no_grad()
def generate(
    model: SRATransformer,
    tok: Tokenizer,
    prompt: str,
    tokens: int = 40,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    k: int | None = None,
    run: str = "",
    step: int = 0,
) -> Generation:
    """Sample ``tokens`` tokens after ``prompt`` and trace the routing of every token.

    Args:
        model: The trained model (put in eval mode for the call, restored after).
        tok: Its tokeniser.
        prompt: Text to continue (at least one token).
        tokens: How many tokens to generate.
        temperature: Softmax temperature, >= 0 (0: always the most likely token).
        top_p: Nucleus mass in (0, 1] (1: sample from the whole distribution).
        seed: Seed of the sampler; the same seed gives the same text.
        k: Experts per token in every MoE layer (None: the schedule's k).
        run: The run folder, for the record.
        step: The checkpoint's step, for the record.

    Raises:
        UsageError: For an empty prompt or a setting out of range.
    """
    from moeblocks.sra.tokenizer import encode

    if tokens < 1:
        raise UsageError(f"--tokens must be >= 1, got {tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"--temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {top_p}")
    E = model.config.num_experts
    if k is not None and not (1 <= k <= E):
        raise UsageError(f"--k must be in [1, {E}] (the run's experts), got {k}")
    ids = encode(tok, prompt).tolist()
    if not ids:
        raise UsageError("--prompt is empty: give at least one character of text")
    S = model.config.seq_len
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        window = ids[-S:]
        res = model(torch.tensor([window], device=device), k=k)
        prompt_tr = tuple(_trace(res, t, tok, i, None) for t, i in enumerate(window))
        out: list[TokenTrace] = []
        for _ in range(tokens):
            i, p = sample_token(res.logits[0, -1], temperature, top_p, generator)
            ids.append(i)
            window = ids[-S:]  # RoPE covers seq_len positions: slide the window
            res = model(torch.tensor([window], device=device), k=k)
            out.append(_trace(res, len(window) - 1, tok, i, p))
    finally:
        model.train(was_training)
    used_k = k if k is not None else model.k
    text = tok.decode([t.id for t in out])
    return Generation(run, step, prompt, text, prompt_tr, tuple(out), used_k, temperature,
                      top_p, seed)  # fmt: skip


def _cells(t: TokenTrace) -> list[str]:
    return [
        " ".join(f"{e}:{w:.2f}" for e, w in zip(es, ws, strict=True))
        for es, ws in zip(t.experts, t.weights, strict=True)
    ]


def format_generation(gen: Generation) -> str:
    """The text, then one line per token: position, token, probability, experts per layer.

    Each layer's cell lists ``expert:weight`` for its K experts, first choice first;
    prompt tokens are numbered ``p0, p1, ...``.
    """
    L = len(gen.tokens[0].experts) if gen.tokens else 0
    lines = [
        f"{gen.run} (step {gen.step}): k {gen.k}, temperature {gen.temperature}, "
        f"top-p {gen.top_p}, seed {gen.seed}",
        f"prompt: {gen.prompt!r}",
        f"text:   {gen.text!r}",
        "",
    ]
    if not L:
        lines.append("(a dense model: no routing to trace)")
        return "\n".join(lines)
    width = max(len(repr(t.text)) for t in (*gen.prompt_tokens, *gen.tokens))
    head = f"{'#':>4}  {'token':<{width}}  {'p':>5}  " + "  ".join(
        f"layer {i} (expert:weight)" for i in range(L)
    )
    lines.append(head)
    rows = [(f"p{n}", t) for n, t in enumerate(gen.prompt_tokens)]
    rows += [(str(n), t) for n, t in enumerate(gen.tokens)]
    for pos, t in rows:
        p = "" if t.prob is None else f"{t.prob:.2f}"
        cells = _cells(t)
        cw = max(len(c) for c in cells)
        lines.append(
            f"{pos:>4}  {t.text!r:<{width}}  {p:>5}  "
            + "  ".join(f"{c:<{max(cw, 22)}}" for c in cells).rstrip()
        )
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def write_generation(gen: Generation, out: Path, command: str = "") -> tuple[Path, Path]:
    """Write ``generate.md`` (text and trace table) and ``generate.json`` into ``out``.

    ``generate.json`` holds every field of :class:`Generation` plus ``command``.

    Returns:
        The paths of the markdown and the JSON file.
    """
    from moeblocks.runtime.durable import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    L = len(gen.tokens[0].experts) if gen.tokens else 0
    parts = [
        f"# Generated by `{gen.run}` (step {gen.step})",
        "",
        f"Command: `{command}`" if command else "",
        "",
        f"k {gen.k}, temperature {gen.temperature}, top-p {gen.top_p}, seed {gen.seed}.",
        "",
        "```text",
        gen.prompt + gen.text,
        "```",
        "",
        "Each token with the experts every MoE layer routed it to, as `expert:weight`, "
        "first choice first; prompt tokens are numbered p0, p1, ...; p is the "
        "probability the sampler gave the token.",
        "",
        "| # | token | p | " + " | ".join(f"layer {i}" for i in range(L)) + " |",
        "|---|---|---|" + "---|" * L,
    ]
    rows = [(f"p{n}", t) for n, t in enumerate(gen.prompt_tokens)]
    rows += [(str(n), t) for n, t in enumerate(gen.tokens)]
    for pos, t in rows:
        p = "" if t.prob is None else f"{t.prob:.2f}"
        cells = " | ".join(_cells(t))
        parts.append(f"| {pos} | `{_md_escape(repr(t.text))}` | {p} | {cells} |")
    md = out / "generate.md"
    atomic_write_text(md, "\n".join(parts) + "\n")
    blob: dict[str, Any] = {"command": command, **asdict(gen)}
    js = out / "generate.json"
    atomic_write_text(js, json.dumps(blob, indent=1, ensure_ascii=False) + "\n")
    return md, js
