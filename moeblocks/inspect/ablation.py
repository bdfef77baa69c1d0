"""``moeblocks experiment routing-ablation``: cosine vs linear routing × k curriculum × balance.

Legend: L MoE layers, E experts, K experts per token.

Trains one SRA run per combination of router (``cosine``, ``linear``), k curriculum
(K=1→4, K=2→4) and balance loss (``bandpass``, ``cv`` = CV²) for every seed, then
measures on the validation split: perplexity at the final k, dead experts (% of all
experts of all layers), word-level subtoken coherence (top-1 agreement, mean over
layers, with its shuffled baseline) and router saturation (mean top-1 probability).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moeblocks.inspect.collect import collect_routing, sra_forward
from moeblocks.inspect.metrics import router_saturation, subtoken_coherence, summarise_layer

__all__ = ["AblationRow", "format_ablation", "routing_ablation"]

VARIANTS = list(itertools.product(("cosine", "linear"), ((1, 4), (2, 4)), ("bandpass", "cv")))


@dataclass(frozen=True)
class AblationRow:
    """Measurements of one trained variant (one seed).

    Attributes:
        name: ``ffn-kA→B-balance``.
        seed: Run seed.
        ppl: Validation perplexity at the final k.
        dead_pct: Dead experts, percent of all experts over all MoE layers.
        coherence: Subtoken top-1 agreement, mean over layers, in [0, 1].
        coherence_baseline: Its shuffled baseline.
        saturation: Mean top-1 router probability, mean over layers.
        seconds: Training wall time.
    """

    name: str
    seed: int
    ppl: float
    dead_pct: float
    coherence: float
    coherence_baseline: float
    saturation: float
    seconds: float


@torch.no_grad()
def _measure(run: Path, max_tokens: int, data: str) -> tuple[float, float, float, float, float]:
    from moeblocks.inspect.report import word_ids_from_pieces
    from moeblocks.sra.data import eval_windows
    from moeblocks.sra.evaluate import evaluate, load_run, run_corpus
    from moeblocks.sra.tokenizer import encode

    model, tok, ckpt = load_run(run, data=data)
    cfg = ckpt.config
    tokens = torch.from_numpy(encode(tok, run_corpus(ckpt).valid)).long()
    ppl = evaluate(model, tokens, cfg.batch_size, max_tokens, k=cfg.k_final).ppl
    model.eval()
    x_WS, _ = eval_windows(tokens, cfg.seq_len, max_tokens)
    rs = collect_routing(sra_forward(model, k=cfg.k_final), x_WS.split(cfg.batch_size))
    words = word_ids_from_pieces([tok.id_to_token(i) or "" for i in rs.token_ids.tolist()])
    dead = sum(len(summarise_layer(r).dead) for r in rs.layers)
    coh = [subtoken_coherence(r, words) for r in rs.layers]
    L = len(rs.layers)
    return (
        ppl,
        100 * dead / (L * cfg.num_experts),
        sum(c.top1_agreement for c in coh) / L,
        sum(c.baseline_top1 for c in coh) / L,
        sum(router_saturation(r) for r in rs.layers) / L,
    )


def routing_ablation(
    out: Path,
    preset: str = "tiny",
    seeds: Sequence[int] = (0,),
    data: str = "pydoc",
    steps: int | None = None,
    max_tokens: int = 16384,
    device: str = "cpu",
    progress: bool = False,
) -> list[AblationRow]:
    """Train and measure every variant; runs go to ``out/<name>-s<seed>``.

    Writes ``out/ablation.md`` (the table) and ``out/ablation.csv`` (one row per run).
    """
    import time

    from moeblocks.sra.config import preset as get_preset
    from moeblocks.sra.train import train

    out = Path(out)
    base = get_preset(preset)
    if steps is not None:
        base = base.replace(steps=steps)
    rows = []
    for seed in seeds:
        for ffn, (k0, k1), balance in VARIANTS:
            name = f"{ffn}-k{k0}to{k1}-{balance}"
            cfg = base.replace(ffn=ffn, k_start=k0, k_final=k1, balance=balance, seed=seed)
            run = out / f"{name}-s{seed}"
            start = time.perf_counter()
            train(cfg, data, run, device=device, progress=progress, overwrite=True)
            seconds = time.perf_counter() - start
            rows.append(AblationRow(name, seed, *_measure(run, max_tokens, data), seconds))
            print(format_ablation(rows[-1:], header=not rows[:-1]), flush=True)
    text = format_ablation(rows)
    (out / "ablation.md").write_text(f"```\n{text}\n```\n", encoding="utf-8")
    csv = ["name,seed,ppl,dead_pct,coherence,coherence_baseline,saturation,seconds"]
    csv += [
        f"{r.name},{r.seed},{r.ppl:.4f},{r.dead_pct:.2f},{r.coherence:.4f},"
        f"{r.coherence_baseline:.4f},{r.saturation:.4f},{r.seconds:.1f}"
        for r in rows
    ]
    (out / "ablation.csv").write_text("\n".join(csv) + "\n", encoding="utf-8")
    return rows


def format_ablation(rows: Sequence[AblationRow], header: bool = True) -> str:
    """Plain-text table of ablation rows (plus per-variant means over seeds when > 1)."""
    lines = []
    if header:
        lines.append(f"{'variant':<26} seed     ppl   dead %   coherence (shuffled)   saturation")
    for r in rows:
        lines.append(
            f"{r.name:<26} {r.seed:4d} {r.ppl:7.2f}  {r.dead_pct:6.1f}   {r.coherence:9.3f} "
            f"({r.coherence_baseline:.3f})   {r.saturation:10.3f}"
        )
    names = list(dict.fromkeys(r.name for r in rows))
    if header and len(rows) > len(names):
        lines.append("means over seeds:")
        for n in names:
            sel = [r for r in rows if r.name == n]
            m = {
                f: sum(getattr(r, f) for r in sel) / len(sel)
                for f in ("ppl", "dead_pct", "coherence", "saturation")
            }
            sd = math.sqrt(sum((r.ppl - m["ppl"]) ** 2 for r in sel) / max(len(sel) - 1, 1))
            lines.append(
                f"{n:<26}  n={len(sel)} {m['ppl']:7.2f}±{sd:.2f}  {m['dead_pct']:5.1f}   "
                f"{m['coherence']:9.3f}            {m['saturation']:10.3f}"
            )
    return "\n".join(lines)
