"""`moeblocks generate`: seeded sampling from a tiny run with the per-token routing trace."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")

from moeblocks.cli import main
from moeblocks.sra.config import SRAConfig, UsageError
from moeblocks.sra.evaluate import load_run
from moeblocks.sra.generate import generate, sample_token

# Tiny models on one intra-op thread: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    from moeblocks.sra.train import train

    cfg = SRAConfig(
        vocab_size=300, seq_len=16, d_model=32, n_layers=2, n_heads=2, num_experts=8,
        d_expert=16, k_start=1, k_final=2, k_switch=0.5, steps=8, batch_size=4, warmup=0.25,
        eval_every=0, eval_tokens=256, ckpt_every=0, dispatcher="torch",
    )  # fmt: skip
    out = tmp_path_factory.mktemp("generate") / "run"
    train(cfg, "synthetic", out, progress=False)
    return out


def test_generate_is_seeded_and_traces_every_token(run: Path) -> None:
    model, tok, ckpt = load_run(run, need_data=False)
    a = generate(model, tok, "the red fox", tokens=20, seed=1, step=ckpt.step)
    b = generate(model, tok, "the red fox", tokens=20, seed=1, step=ckpt.step)
    assert a == b  # text, probabilities and routing: bit for bit
    c = generate(model, tok, "the red fox", tokens=20, seed=2)
    assert [t.id for t in c.tokens] != [t.id for t in a.tokens]
    assert len(a.tokens) == 20
    assert a.k == 2 == model.k
    assert tok.decode([t.id for t in a.prompt_tokens]) == "the red fox"
    assert a.text == tok.decode([t.id for t in a.tokens])
    for t in (*a.prompt_tokens, *a.tokens):
        assert len(t.experts) == 2  # one entry per MoE layer
        for experts, weights in zip(t.experts, t.weights, strict=True):
            assert len(experts) == len(set(experts)) == 2
            assert all(0 <= e < 8 for e in experts)
            assert math.isclose(sum(weights), 1.0, abs_tol=1e-3)  # renormalised, rounded
    assert all(t.prob is None for t in a.prompt_tokens)
    assert all(0 < t.prob <= 1 for t in a.tokens)
    # Beyond seq_len (16) the window slides; a forced k shows in every layer.
    long = generate(model, tok, "the", tokens=24, temperature=0.0, k=3)
    assert all(len(ex) == 3 for t in long.tokens for ex in t.experts)
    assert all(t.prob == 1.0 for t in long.tokens)  # greedy


def test_the_trace_reports_the_routing_of_each_token_as_it_is_read(run: Path) -> None:
    model, tok, _ = load_run(run, need_data=False)
    gen = generate(model, tok, "a dog sees", tokens=5, temperature=0.0)
    ids = [t.id for t in (*gen.prompt_tokens, *gen.tokens)]
    with torch.no_grad():  # all of it fits one window: one pass gives the same routing
        res = model(torch.tensor([ids]))
    for pos, t in enumerate((*gen.prompt_tokens, *gen.tokens)):
        for layer, r in enumerate(res.routings):
            assert list(t.experts[layer]) == r.experts[pos].tolist()


def test_sample_token_top_p_and_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([3.0, 2.0, 0.0, -1.0])
    assert sample_token(logits, 0.0, 1.0, g) == (0, 1.0)
    # A nucleus of mass 0.5 holds only the most likely token (p ~ 0.7).
    assert {sample_token(logits, 1.0, 0.5, g)[0] for _ in range(20)} == {0}
    drawn = {sample_token(logits, 5.0, 1.0, g)[0] for _ in range(200)}
    assert drawn == {0, 1, 2, 3}


def test_generate_command_prints_and_writes_the_trace(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", str(run), "--prompt", "the cat", "--tokens", "6", "--seed", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "layer 0 (expert:weight)" in printed
    assert "layer 1 (expert:weight)" in printed
    assert "prompt: 'the cat'" in printed
    blob = json.loads((run / "reports" / "generate.json").read_text(encoding="utf-8"))
    assert blob["seed"] == 4
    assert blob["prompt"] == "the cat"
    assert len(blob["tokens"]) == 6
    assert blob["step"] == 8
    assert len(blob["tokens"][0]["experts"]) == 2
    md = (run / "reports" / "generate.md").read_text(encoding="utf-8")
    assert "| # | token | p | layer 0 | layer 1 |" in md
    assert md.count("\n| ") == len(blob["prompt_tokens"]) + 6 + 1  # rows + header
    assert main(argv) == 0  # the same seed prints the same trace
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "a", "--k", "9"], "--k must be in [1, 8]"),
    ],
)
def test_generate_errors(
    run: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", str(run), *extra]) == 2
    assert message in capsys.readouterr().err


def test_generate_rejects_bad_flags(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for flag, value in (("--top-p", "0"), ("--temperature", "-1"), ("--tokens", "0")):
        with pytest.raises(SystemExit):
            main(["generate", str(run), "--prompt", "a", flag, value])
        assert f"argument {flag}" in capsys.readouterr().err
    model, tok, _ = load_run(run, need_data=False)
    with pytest.raises(UsageError, match="top-p"):
        generate(model, tok, "a", top_p=1.5)
