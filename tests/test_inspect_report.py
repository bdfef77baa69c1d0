"""`moeblocks inspect` on a tiny trained run: tables, RUN/reports/inspect.md, plots, log fields."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tokenizers")

from moeblocks.cli.inspect import add_inspect
from moeblocks.inspect.report import word_ids_from_pieces

# Tiny models on one intra-op thread: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_word_ids_from_pieces():
    pieces = ["yes", "ter", "day", "Ġ,", "Ġthe", "Ġ", "r", "ed", "Ċ", "cat", "."]
    assert word_ids_from_pieces(pieces).tolist() == [0, 0, 0, -1, 1, -1, 2, 2, -1, 3, -1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread) -> Path:
    from moeblocks.sra.config import preset
    from moeblocks.sra.train import train

    out = tmp_path_factory.mktemp("inspect") / "run"
    cfg = preset("tiny").replace(
        vocab_size=300, seq_len=32, d_model=32, n_layers=2, num_experts=8, d_expert=16,
        steps=30, batch_size=8, eval_every=0, ckpt_every=0, eval_tokens=256, warmup=5 / 30,
    )  # fmt: skip
    train(cfg, "synthetic", out, progress=False, overwrite=True)
    return out


def _inspect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moeblocks")
    add_inspect(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", *argv])
    return args.handler(args)


def test_inspect_command_writes_report_with_pngs(tiny_run, capsys):
    text = "now , the red fox sees a dog ."
    assert _inspect([str(tiny_run), "--max-tokens", "512", "--text", text, "--quiet"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert captured.err == ""  # --quiet: no progress bar
    assert "routing collected over 512 tokens" in printed
    assert "overlap probe (synthetic, 16 items)" in printed
    assert "condition contrast (synthetic-swap, 6 'similar' vs 6 'dissimilar'" in printed
    # The line itself says why eval's perplexity differs, and how to get the same.
    assert re.search(
        r"k-sweep \(perplexity over the first 512 of \d+ validation tokens; eval reads all "
        r"\d+, eval --max-tokens 512 these\):",
        printed,
    )
    assert "purity" in printed
    assert "sentence trace" in printed
    assert "'now'" in printed
    out = tiny_run / "reports"  # the run's one report folder
    report = (out / "inspect.md").read_text()
    names = ["inspect-utilisation.png", "inspect-anchors.png", "inspect-classes-layer0.png",
             "inspect-classes-layer1.png", "inspect-k-sweep.png", "inspect-routing-map.png",
             "training-curves.png", "training-utilisation.png", "training-dead.png",
             "training-entropy.png"]  # fmt: skip
    for name in names:
        assert is_png(out / name), name
        assert f"({name})" in report


def test_inspect_svg_into_another_folder(tiny_run, tmp_path, capsys):
    out = tmp_path / "svg"
    argv = [str(tiny_run), "--max-tokens", "256", "--no-k-sweep", "--format", "svg"]
    assert _inspect([*argv, "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert (out / "inspect-utilisation.svg").read_bytes().startswith(b"<?xml")
    assert "(inspect-routing-map.svg)" in (out / "inspect.md").read_text()
    assert not list(out.glob("*.png"))
    with pytest.raises(SystemExit):
        _inspect([str(tiny_run), "--max-tokens", "-5"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_log_records_carry_expert_counts_and_router_entropy(tiny_run):
    import json
    import math

    from moeblocks.sra.checkpoint import find_checkpoint
    from moeblocks.sra.model import build_schedule

    cfg = find_checkpoint(tiny_run).config
    recs = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [10, 20, 30]
    schedule = build_schedule(cfg)
    slots = 0
    for r in recs:
        counts = torch.tensor(r["expert_counts"])
        assert counts.shape == (cfg.n_layers, cfg.num_experts)
        assert all(0 < h <= math.log(cfg.num_experts) for h in r["router_entropy"])
        slots += int(counts[0].sum())
    # Every routed slot of every step lands in exactly one window.
    expected = 0
    for step in range(cfg.steps):
        expected += cfg.batch_size * cfg.seq_len * schedule.k_at(step)
    assert slots == expected


def test_inspect_and_eval_print_the_same_perplexity(tiny_run, capsys, tmp_path):
    # Issue 32: inspect printed 16.49 over 8,192 tokens, eval 19.82 over 9,984. On the
    # same token budget the k-sweep's training k and eval's perplexity are one number.
    from moeblocks.cli import main

    out = ["--out", str(tmp_path), "--quiet"]
    assert _inspect([str(tiny_run), "--max-tokens", "256", "--format", "svg", *out]) == 0
    inspected = capsys.readouterr().out
    assert main(["eval", str(tiny_run), "--max-tokens", "256", *out]) == 0
    evaluated = capsys.readouterr().out
    k_train = int(re.search(r"k \d+->(\d+)", evaluated)[1])
    eval_ppl = re.search(r"perplexity (\S+) over 256 tokens", evaluated)[1]
    sweep = dict(re.findall(r"k=(\d+): (\S+?)(?=\s|$)", inspected.split("k-sweep", 1)[1]))
    assert sweep[str(k_train)] == eval_ppl  # printed to 2 decimals: the same string
    assert "over the first 256 of" in inspected
